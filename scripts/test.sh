#!/usr/bin/env bash
# Set up ./.venv with the test extras and run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh test,systemd
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
