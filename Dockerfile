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

# Listen on every interface of the container; credentials are required there (see above). The admin
# listener (/healthz, /readyz, /metrics) stays on the container's loopback: publish or move it with
# ZEP_ADMIN_ADDRESS=0.0.0.0:9090 to scrape it from outside.
ENV PROXY_HOST=0.0.0.0 \
    SOCKS_PORT=1080 \
    HTTP_PORT=8080 \
    ZEP_ADMIN_ADDRESS=127.0.0.1:9090 \
    PYTHONUNBUFFERED=1
EXPOSE 1080 8080

# Healthy while /readyz answers 200 on loopback at the admin port: listening, every identity loaded,
# not draining (urllib raises on a 503 or a refused connection; slim images have no curl; no proxy
# variable of the container diverts it). Checked every 2 s while starting (identities load within
# ZEP_ZITI_LOAD_TIMEOUT), then every 30 s.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --start-interval=2s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u\nport = os.environ['ZEP_ADMIN_ADDRESS'].rsplit(':', 1)[1]\nu.build_opener(u.ProxyHandler({})).open(f'http://127.0.0.1:{port}/readyz', timeout=3)\n"]

CMD ["zep", "serve"]
