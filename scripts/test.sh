#!/usr/bin/env bash
# Install everything the tests need into ./.venv, then run the whole test suite (CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# Two pytest workers (pytest-xdist), each test file on one worker (its module fixtures are built
# once); PYTEST_WORKERS=0 runs everything in this process.
exec python -m pytest -q -n "${PYTEST_WORKERS:-2}" --dist loadfile "$@"
