#!/usr/bin/env bash
# The README's test command: install what the tests use as real peers, set up ./.venv with the
# test extras, run every test. As root on Debian it installs the missing packages itself:
# rsyslogd and its imrelp module (syslog sink), logrotate (file sink), prometheus and promtool
# (metrics, dashboard, alerts), tmux (`amid top` in a terminal), systemd-analyze (unit file), openssl
# (TLS certificates), unshare (journald test), podman + runc + mmdebstrap (the container image is
# built and run: tests/test_container.py), RabbitMQ and nats-server (amqp and nats sinks), and what
# building systemd-python and amid's C accelerator needs.
# Without them (not root), the tests that need one are skipped; as root, or with CI set, they fail.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(rsyslog rsyslog-relp logrotate prometheus tmux systemd openssl util-linux libsystemd-dev
          pkg-config gcc podman runc mmdebstrap rabbitmq-server nats-server)
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

    # The brokers the amqp and nats sink tests publish to run on every machine; start the one
    # that has stopped and wait (bounded) until it answers. A broker still silent after that
    # fails those tests.
    answers() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
    if ! answers 5672; then
        echo "starting RabbitMQ"
        rabbitmq-server -detached >/dev/null 2>&1 || true
    fi
    if ! answers 4222; then
        echo "starting nats-server"
        mkdir -p /var/lib/nats-server
        start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- \
            -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log || true
    fi
    for port in 5672 4222; do
        for _ in $(seq 1 120); do answers "$port" && break; sleep 0.5; done
        answers "$port" || echo "nothing answers on 127.0.0.1:$port after 60 s" >&2
    done
fi

scripts/bootstrap.sh test,systemd,amqp,nats
# Lint and types first (configured in pyproject.toml): any finding fails the run.
.venv/bin/ruff check --no-cache .
.venv/bin/mypy
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
