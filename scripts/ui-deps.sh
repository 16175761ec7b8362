#!/usr/bin/env bash
# What the web UI's checks need, installed once: the npm packages of ui/ (npm ci, again whenever
# package-lock.json changes) and a browser for the end-to-end test (tests/ui.rs): Debian's chromium, or the
# one CHROMIUM names; and Rust's wasm32-unknown-unknown target for the WebAssembly SDK. Nothing here downloads a
# browser of its own.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/apt-install.sh

if [ -z "${CHROMIUM:-}" ] && ! [ -x /usr/bin/chromium ]; then
    apt_install chromium "the UI's end-to-end test drives it" \
        "the UI's end-to-end test needs Chromium: \`sudo apt-get install chromium\`, or set CHROMIUM to a browser"
fi
# The WebAssembly SDK (ui/packages/wasm) is built from crates/wasm for this target.
if command -v rustup >/dev/null && ! rustup target list --installed | grep -qx wasm32-unknown-unknown; then
    echo "== adding the wasm32-unknown-unknown target (the WebAssembly SDK)"
    rustup target add wasm32-unknown-unknown
fi
if ! cmp -s ui/package-lock.json ui/node_modules/.installed-lock 2>/dev/null; then
    echo "== installing the UI's npm packages (npm ci in ui/)"
    (cd ui && npm ci --no-audit --no-fund --loglevel=error)
    cp ui/package-lock.json ui/node_modules/.installed-lock
fi
