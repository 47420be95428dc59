#!/usr/bin/env bash
# Smoke-test a built zep image (CI and releases run it before anything is pushed):
#   1. with the default credentials it refuses to start, exit code 2, saying how to set them;
#   2. with a password from a mounted file and direct dialing it becomes healthy, and
#      scripts/smoke_test.py fetches a payload through both listeners and asks the admin endpoint;
#   3. SIGTERM stops it with exit code 0, and its log never shows the password.
# Usage: scripts/smoke-test-image.sh IMAGE
set -euo pipefail

image=${1:?usage: smoke-test-image.sh IMAGE}
here=$(cd "$(dirname "$0")" && pwd)
name=zep-smoke-$$
work=$(mktemp -d)
trap 'docker rm -f "$name" "$name-refused" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
health_wait=90   # seconds: the start period plus a few checks
refusal_wait=60  # seconds: the refusal comes before anything starts

echo "--- default credentials are refused"
code=0
timeout "$refusal_wait" docker run --rm --name "$name-refused" -e ZEP_DIRECT=true "$image" 2>"$work/refused" || code=$?
cat "$work/refused"
if [ "$code" != 2 ] || ! grep -q "PROXY_PASSWORD_FILE" "$work/refused"; then
    echo "expected exit code 2 and how to set credentials, got exit code $code" >&2
    exit 1
fi

echo "--- serving with a password file"
python3 -c 'import secrets; print(secrets.token_urlsafe(24))' >"$work/proxy-password"
chmod 0644 "$work/proxy-password"   # the image runs as uid 10001
# The host's network: the payload server of smoke_test.py listens on the runner's loopback.
docker run -d --name "$name" --network host \
    -v "$work/proxy-password:/run/secrets/proxy-password:ro" \
    -e ZEP_DIRECT=true -e PROXY_USERNAME=smoke -e PROXY_PASSWORD_FILE=/run/secrets/proxy-password \
    "$image" >/dev/null

status=starting
for _ in $(seq "$health_wait"); do
    status=$(docker inspect --format '{{.State.Health.Status}}' "$name")
    [ "$status" = starting ] || break
    sleep 1
done
if [ "$status" != healthy ]; then
    echo "the container is $status" >&2
    docker logs "$name"
    exit 1
fi

# The admin endpoint is checked when the image configures one (ZEP_ADMIN_ADDRESS in its ENV).
admin=$(docker exec "$name" printenv ZEP_ADMIN_ADDRESS || true)
[ -n "$admin" ] || echo "--- the image sets no ZEP_ADMIN_ADDRESS: no admin checks"
python3 "$here/smoke_test.py" --socks 127.0.0.1:1080 --http 127.0.0.1:8080 ${admin:+--admin "$admin"} \
    --username smoke --password-file "$work/proxy-password"

echo "--- SIGTERM stops it cleanly"
docker stop --time 30 "$name" >/dev/null
docker logs "$name" >"$work/log" 2>&1
cat "$work/log"
code=$(docker inspect --format '{{.State.ExitCode}}' "$name")
[ "$code" = 0 ] || { echo "exit code $code after SIGTERM" >&2; exit 1; }
if grep -qF -- "$(cat "$work/proxy-password")" "$work/log"; then
    echo "the password reached the log" >&2
    exit 1
fi
echo "image smoke test passed"
