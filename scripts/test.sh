#!/usr/bin/env bash
# The README's test command: install what the tests use as real peers, set up ./.venv with the
# test extras, run every test. As root on Debian it installs the missing packages itself:
# rsyslogd and its imrelp module (syslog sink), logrotate (file sink), prometheus and promtool
# (metrics, dashboard, alerts), tmux (`amid top` in a terminal), systemd-analyze (unit file), openssl
# (TLS certificates), unshare (journald test), podman + runc + mmdebstrap (the container image is
# built and run: tests/test_container.py), and what building systemd-python and amid's
# C accelerator needs.
# Without them (not root), the tests that need one are skipped; as root, or with CI set, they fail.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(rsyslog rsyslog-relp logrotate prometheus tmux systemd openssl util-linux libsystemd-dev
          pkg-config gcc podman runc mmdebstrap)
# gcc also builds amid's C accelerator (tests/test_speedups.py), which needs Python's headers.
if ! python3 -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; then
    packages+=(python3-dev)
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    missing=()
    for p in "${packages[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if ((${#missing[@]})); then
        echo "installing Debian packages: ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            -o Dpkg::Options::=--force-confold "${missing[@]}" >/dev/null
    fi
    # Every peer is installed now: a test that finds one missing fails instead of skipping.
    export CI="${CI:-true}"
fi

scripts/bootstrap.sh test,systemd
# Lint and types first (configured in pyproject.toml): any finding fails the run.
.venv/bin/ruff check --no-cache .
.venv/bin/mypy
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
