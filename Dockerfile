# syntax=docker/dockerfile:1
# graphsync container image.
#
#   docker build -t graphsync:0.1.0 --build-arg SOURCE_URL=https://example.org/graphsync.git .
#   docker run IMAGE            the daemon (CMD ["run"]); health at :9464/healthz and /readyz
#   docker run IMAGE sync       every job once, then exit (0 ok, 1 failed, 2 config, 3 busy)
#
# Configuration: mount a config at /etc/graphsync/config.toml (the default path) or set
# GRAPHSYNC_CONFIG, and/or GRAPHSYNC_<SECTION>__<KEY> variables; secrets as mounted files or
# variables. The image sets [metrics] port 9464 on 0.0.0.0 through the environment (it wins over
# the file): override GRAPHSYNC_METRICS__PORT / GRAPHSYNC_METRICS__HOST to change them.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- builder: the graphsync wheel and the wheels of its pinned dependencies -------------------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY daemon/ daemon/
RUN pip wheel --no-cache-dir --wheel-dir /wheels --constraint constraints.txt .

# --- final: the wheels installed into the stock interpreter; no compiler, no pip cache ---------
FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
ARG SOURCE_URL=""
LABEL org.opencontainers.image.title="graphsync" \
      org.opencontainers.image.description="Export Microsoft Graph collections on a schedule, sharing one MSAL token cache across replicas through Azure Blob Storage" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.version="${VERSION}"

# The wheels are bind-mounted from the builder for this one step, so they are not in any layer.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels /wheels/graphsync-*.whl \
    && groupadd --system --gid 10001 graphsync \
    && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
               --shell /usr/sbin/nologin graphsync \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/graphsync

# PYTHON*: logs reach `docker logs` at once; no .pyc writes into a read-only root filesystem.
# The [output] directory default is already /var/lib/graphsync; it is deliberately not set here,
# since a variable would override the file and clash with `[output] container = ...` there.
# STATE_DIRECTORY (systemd's name for it) puts the working stores under /var/lib/graphsync/work by
# default, on the volume, without overriding `[output] work_directory` in the file.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    STATE_DIRECTORY=/var/lib/graphsync \
    GRAPHSYNC_METRICS__PORT=9464 \
    GRAPHSYNC_METRICS__HOST=0.0.0.0

VOLUME ["/var/lib/graphsync"]
WORKDIR /var/lib/graphsync
USER 10001:10001
EXPOSE 9464

# Only `run` serves /healthz; for `docker run IMAGE sync` the check reports unhealthy, harmlessly.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9464/healthz', timeout=4)"]

# Exec form: graphsync is PID 1 and gets SIGTERM itself (it stops within 8 s; docker waits 10 s).
ENTRYPOINT ["graphsync"]
CMD ["run"]
