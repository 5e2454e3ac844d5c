# amid container image: the daemon on Debian 12 slim with Debian's Python, as a numeric non-root user,
# fine with --read-only.
#
#   docker build -t amid .            (podman/buildah: add --format docker, or the HEALTHCHECK is dropped)
#   docker run --read-only -v amid-state:/var/lib/amid -v "$PWD/amid.yaml:/etc/amid/amid.yaml:ro" -p 9180:9180 amid
#
# Configuration: a file mounted at /etc/amid/amid.yaml, and/or AMID_* environment overrides
# (AMID_HOST, AMID_USERNAME, AMID_SECRET_FILE=/run/secrets/ami, AMID_SINKS__0__TYPE=webhook, ...).
# The image writes only to the /var/lib/amid volume (spool, dead letters, a file sink's relative paths).
# For reproducible builds also pin the base by digest: debian:bookworm-slim@sha256:<digest>.
#
# Behind a proxy or a private package index, hand pip its configuration for the build only (never baked
# into a layer): --secret id=pip.conf,src=/etc/pip.conf [--secret id=pip-ca.pem,src=/path/to/ca.pem]
# (the pip.conf then says `cert = /run/secrets/pip-ca.pem`).

# ---- base: Debian's own Python, shared by both stages (the virtualenv's python points at it)
FROM debian:bookworm-slim AS base
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/*

# ---- builder: amid and its dependencies in a self-contained virtualenv
FROM base AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CONFIG_FILE=/run/secrets/pip.conf

# A C compiler and Python's headers for amid's optional accelerator (record JSON ~5x faster);
# the final stage has neither.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev python3-dev python3-venv \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/amid

WORKDIR /src
COPY pyproject.toml setup.py MANIFEST.in README.md LICENSE ./
COPY config/amid.yaml ./config/amid.yaml
COPY amid ./amid
# pip byte-compiles what it installs, so the read-only image never needs to write __pycache__.
# The accelerator must import: a build that silently fell back to pure Python fails here (-P: not
# from the source tree in the working directory, which has no compiled module). Then pip and
# setuptools leave the virtualenv: the final stage installs nothing.
RUN --mount=type=secret,id=pip.conf --mount=type=secret,id=pip-ca.pem \
    /opt/amid/bin/pip install --no-cache-dir . \
    && /opt/amid/bin/python -P -c "import amid.ami._speedups" \
    && /opt/amid/bin/amid --version \
    && /opt/amid/bin/pip uninstall --yes --quiet pip setuptools \
    && rm -f /opt/amid/bin/activate* /opt/amid/bin/Activate.ps1 \
    && find /opt/amid -name '*.c' -delete

# ---- final: the virtualenv on the same base; no compiler, no pip, no curl
FROM base

ENV PATH=/opt/amid/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/var/lib/amid \
    AMID_STATE_DIR=/var/lib/amid \
    AMID_HTTP__LISTEN=0.0.0.0:9180

COPY --from=builder /opt/amid /opt/amid

RUN mkdir -p /etc/amid /var/lib/amid \
    && chown 10001:10001 /var/lib/amid \
    && chmod 0750 /var/lib/amid
VOLUME ["/var/lib/amid"]
WORKDIR /var/lib/amid

USER 10001:10001

# /metrics, /livez and /readyz (AMID_HTTP__LISTEN above: all interfaces, so probes and scrapes reach it).
EXPOSE 9180

# amid is PID 1 and handles SIGTERM itself: stop reading, Logoff, drain within shutdown_timeout (20s, under
# Docker's and Kubernetes' grace periods), spool the rest, exit 0. A second signal exits at once.
STOPSIGNAL SIGTERM
# `amid healthcheck` asks /readyz at the http.listen of the same config the daemon reads (file and AMID_*).
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 CMD ["amid", "healthcheck"]

ENTRYPOINT ["amid"]
CMD ["run", "--log-format", "json"]
