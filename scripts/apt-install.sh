# Sourced by scripts/test.sh and scripts/ui-deps.sh: installs a Debian package the tests need, or says how to.
#
#   apt_install PACKAGE WHY HELP   WHY completes "installing PACKAGE (...)"; HELP is the error's advice when
#                                  this shell cannot install (not root, or no apt-get).

apt_install() {
    local package=$1 why=$2 help=$3
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "== installing Debian's $package ($why)"
        # The package lists of a fresh machine may be missing or stale: update once, then retry.
        apt-get install -y -q "$package" >/dev/null 2>&1 \
            || { apt-get update -q >/dev/null && apt-get install -y -q "$package" >/dev/null; }
    else
        echo "error: $help" >&2
        exit 1
    fi
}
