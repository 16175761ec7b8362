# Sourced by scripts/test.sh and scripts/ui-deps.sh: installs a Debian package the tests need, or says how to.
#
#   apt_install PACKAGE WHY HELP   WHY completes "installing PACKAGE (...)"; HELP is the error's advice when
#                                  this shell cannot install (neither root nor allowed sudo without a
#                                  password, or no apt-get).

apt_install() {
    local package=$1 why=$2 help=$3 as_root=()
    if [ "$(id -u)" != 0 ]; then
        as_root=(sudo -n)
    fi
    if command -v apt-get >/dev/null && { [ ${#as_root[@]} = 0 ] || sudo -n apt-get --version >/dev/null 2>&1; }; then
        echo "== installing Debian's $package ($why)"
        # The package lists of a fresh machine may be missing or stale: update once, then retry.
        "${as_root[@]}" apt-get install -y -q "$package" >/dev/null 2>&1 \
            || { "${as_root[@]}" apt-get update -q >/dev/null && "${as_root[@]}" apt-get install -y -q "$package" >/dev/null; }
    else
        echo "error: $help" >&2
        exit 1
    fi
}
