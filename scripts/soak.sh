#!/usr/bin/env bash
# The soak: a real `amid run` against the numbering simulator for MINUTES (default 10), the webhook
# sink down 40 s of every 2 minutes; checks that RSS and the spool stay bounded and that the
# conservation oracle holds at the end. Usage: scripts/soak.sh [MINUTES] [--rate N] [--keep] ...
# Needs the test extras: scripts/bootstrap.sh test
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || { echo "run scripts/bootstrap.sh test first" >&2; exit 1; }
PYTHONPATH=tests exec .venv/bin/python -m conservation.soak "$@"
