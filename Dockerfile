# syntax=docker/dockerfile:1
# zep: a userspace SOCKS5 + HTTP proxy into an OpenZiti overlay.
#
#   docker build -t ziti-edge-proxy .
#   docker run --rm -e ZITI_IDENTITY="$(base64 -w0 my-identity.json)" \
#       -e PROXY_USERNAME=ci -e PROXY_PASSWORD=change-me \
#       -p 127.0.0.1:1080:1080 -p 127.0.0.1:8080:8080 ziti-edge-proxy
#
# The listeners are reachable from outside the container, so zep refuses to start with the default
# credentials or none: set PROXY_USERNAME and PROXY_PASSWORD, or mount secrets and point
# PROXY_PASSWORD_FILE / ZITI_IDENTITY_FILE at them. The original ziti-edge-proxy variables work
# unchanged (PROXY_HOST, SOCKS_PORT, HTTP_PORT, PROXY_USERNAME, PROXY_PASSWORD, ZITI_IDENTITIES,
# ZITI_IDENTITY), as do zep's ZEP_* ones.

ARG PYTHON_VERSION=3.12

# ---- build: wheels for zep (with its compiled relay) and every dependency, incl. openziti,
# whose build downloads the native OpenZiti library for this platform.
FROM python:${PYTHON_VERSION}-slim-bookworm AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY src ./src
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[ziti]" \
    && python -c "import glob, sys, zipfile; \
names = zipfile.ZipFile(glob.glob('/wheels/ziti_edge_proxy-*.whl')[0]).namelist(); \
sys.exit(0 if any(n.startswith('zep/_relay') and n.endswith('.so') for n in names) else 'the compiled relay was not built')"

# ---- run: the installed wheels only (bind-mounted for the one step, so no layer keeps them), no
# compiler, a user without privileges.
FROM python:${PYTHON_VERSION}-slim-bookworm
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links /wheels "ziti-edge-proxy[ziti]" \
    && useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin zep
USER 10001:10001
WORKDIR /tmp

# Listen on every interface of the container; credentials are required there (see above).
ENV PROXY_HOST=0.0.0.0 \
    SOCKS_PORT=1080 \
    HTTP_PORT=8080 \
    PYTHONUNBUFFERED=1
EXPOSE 1080 8080

# Healthy when each enabled listener accepts a connection and the SOCKS5 one answers a greeting.
# Checked every 2 s while starting (identities load within ZEP_ZITI_LOAD_TIMEOUT), then every 30 s.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --start-interval=2s --retries=3 \
    CMD ["python", "-c", "import os, socket\non = lambda name: os.environ.get(name, 'true').strip().lower() in ('1', 'true', 'yes', 'on')\nif on('SOCKS_ENABLED'):\n    with socket.create_connection(('127.0.0.1', int(os.environ.get('SOCKS_PORT', '1080'))), 3) as s:\n        s.sendall(b'\\x05\\x01\\x00')\n        assert s.recv(2)[:1] == b'\\x05', 'no SOCKS5 answer'\nif on('HTTP_ENABLED'):\n    socket.create_connection(('127.0.0.1', int(os.environ.get('HTTP_PORT', '8080'))), 3).close()\n"]

CMD ["zep", "serve"]
