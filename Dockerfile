# zep: a userspace SOCKS5 + HTTP proxy into an OpenZiti overlay.
#
#   docker build -t ziti-edge-proxy .
#   docker run --rm -e ZITI_IDENTITY="$(base64 -w0 my-identity.json)" \
#       -e PROXY_USERNAME=ci -e PROXY_PASSWORD=change-me \
#       -p 127.0.0.1:1080:1080 -p 127.0.0.1:8080:8080 ziti-edge-proxy
#
# The original ziti-edge-proxy variables work unchanged (PROXY_HOST, SOCKS_PORT, HTTP_PORT,
# PROXY_USERNAME, PROXY_PASSWORD, ZITI_IDENTITIES, ZITI_IDENTITY), as do zep's ZEP_* ones.

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

# ---- run: the wheels only, no compiler, a user without privileges.
FROM python:${PYTHON_VERSION}-slim-bookworm
COPY --from=build /wheels /tmp/wheels
RUN pip install --no-cache-dir --no-index --find-links /tmp/wheels "ziti-edge-proxy[ziti]" \
    && rm -rf /tmp/wheels \
    && useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin zep
USER 10001:10001
WORKDIR /tmp

# Listen on every interface of the container (publish the ports on 127.0.0.1 of the host, or set
# real credentials); ZEP_ALLOW_REMOTE says that a non-loopback listener is meant.
ENV PROXY_HOST=0.0.0.0 \
    SOCKS_PORT=1080 \
    HTTP_PORT=8080 \
    ZEP_ALLOW_REMOTE=true \
    PYTHONUNBUFFERED=1
EXPOSE 1080 8080

# Healthy when each enabled listener accepts a connection and the SOCKS5 one answers a greeting.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, socket\non = lambda name: os.environ.get(name, 'true').strip().lower() in ('1', 'true', 'yes', 'on')\nif on('SOCKS_ENABLED'):\n    with socket.create_connection(('127.0.0.1', int(os.environ.get('SOCKS_PORT', '1080'))), 3) as s:\n        s.sendall(b'\\x05\\x01\\x00')\n        assert s.recv(2)[:1] == b'\\x05', 'no SOCKS5 answer'\nif on('HTTP_ENABLED'):\n    socket.create_connection(('127.0.0.1', int(os.environ.get('HTTP_PORT', '8080'))), 3).close()\n"]

CMD ["zep", "serve"]
