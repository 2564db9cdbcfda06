#!/usr/bin/env bash
# Install into ./.venv, then run the demo: build the stock tiny model, transform it (debug dump
# in ./vpmoe-demo-dump), train N steps eager and N steps under torch.compile.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec python -m vpmoe_compile demo "$@"
