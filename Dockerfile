# amid container image: the daemon on a slim Python base, as a numeric non-root user, fine with --read-only.
#
#   docker build -t amid .
#   docker run --read-only -v amid-state:/var/lib/amid -v "$PWD/amid.yaml:/etc/amid/amid.yaml:ro" -p 9180:9180 amid
#
# Configuration: a file mounted at /etc/amid/amid.yaml, and/or AMID_* environment overrides
# (AMID_HOST, AMID_USERNAME, AMID_SECRET_FILE=/run/secrets/ami, AMID_SINKS__0__TYPE=webhook, ...).
# The image writes only to the /var/lib/amid volume (spool, dead letters, a file sink's relative paths).
# For reproducible builds also pin the base by digest: python:3.11-slim-bookworm@sha256:<digest>.

# ---- builder: amid and its dependencies in a self-contained virtualenv
FROM python:3.11-slim-bookworm AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A C compiler for amid's optional accelerator (record JSON ~5x faster); the final stage has none.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

RUN python -m venv /opt/amid

WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY amid ./amid
# pip byte-compiles what it installs, so the read-only image never needs to write __pycache__.
# The accelerator must import: a build that silently fell back to pure Python fails here.
RUN /opt/amid/bin/pip install --no-cache-dir . \
    && /opt/amid/bin/python -c "import amid.ami._speedups" \
    && /opt/amid/bin/amid --version

# ---- final: the virtualenv on a fresh slim base; no compiler, no pip cache, no curl
FROM python:3.11-slim-bookworm

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
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 CMD ["amid", "healthcheck"]

ENTRYPOINT ["amid"]
CMD ["run", "--log-format", "json"]
