#!/usr/bin/env bash
# Create ./.venv with amid installed in editable mode. Usage: scripts/bootstrap.sh [EXTRAS]
# e.g. `scripts/bootstrap.sh test,systemd`. Needs only python3 (>= 3.11); on Debian, when run as
# root, it installs python3-venv itself if the venv module is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"

if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "amid needs Python >= 3.11 (found $(python3 --version 2>&1))" >&2
    exit 1
fi
if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    else
        echo "python3's venv module is missing: sudo apt-get install python3-venv" >&2
        exit 1
    fi
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
# amid's distribution was once called "amid" (on the package index that is another project); an
# editable install of this checkout under the old name would shadow the new one: it goes first.
if .venv/bin/python -m pip show amid 2>/dev/null | grep -xF "Editable project location: $PWD" >/dev/null; then
    .venv/bin/python -m pip uninstall -q -y amid
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extras:+[$extras]}"
