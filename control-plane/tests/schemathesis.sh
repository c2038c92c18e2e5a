#!/usr/bin/env bash
# Schemathesis against the control plane's own OpenAPI document (GET /api/openapi.json), with
# an admin's API token: generated requests for every operation, and a failure for any 5xx, any
# response whose body does not match its documented schema, or an undocumented content type.
# Logging out and revoking tokens are left out: the run would revoke its own token.
# Usage: control-plane/tests/schemathesis.sh [MAX_EXAMPLES]   (`just schemathesis`)
set -euo pipefail
cd "$(dirname "$0")/../.."

command -v schemathesis >/dev/null \
    || { echo "schemathesis is missing: python3 -m pip install schemathesis==4.32.5" >&2; exit 1; }
bin=target/debug/outpost
[ -x "$bin" ] || { echo "$bin is missing: cargo build --bins" >&2; exit 1; }

dir=$(mktemp -d)
pid=""
cleanup() { if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; fi; rm -rf "$dir"; }
trap cleanup EXIT
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
base="http://127.0.0.1:$port"

echo "schemathesis-password-1" | "$bin" admin create-user admin --role admin --password-stdin --data-dir "$dir" >/dev/null
token=$("$bin" admin api-token admin --ttl 1d --data-dir "$dir" 2>/dev/null)
"$bin" serve --listen "127.0.0.1:$port" --data-dir "$dir" > "$dir/serve.log" 2>&1 &
pid=$!
for _ in $(seq 1 100); do curl -fsS "$base/healthz" >/dev/null 2>&1 && break; sleep 0.1; done
curl -fsS -H "Authorization: Bearer $token" "$base/api/openapi.json" > "$dir/openapi.json"

status=0
schemathesis run "$dir/openapi.json" --url "$base" -H "Authorization: Bearer $token" \
    --checks not_a_server_error,response_schema_conformance,content_type_conformance \
    --exclude-operation-id-regex '^delete_api_v1_(sessions|tokens_id)$' \
    --max-examples "${1:-50}" --seed 1 --workers 2 || status=$?

if ! kill -0 "$pid" 2>/dev/null; then
    echo "FAIL: the control plane is gone after the run:" >&2
    tail -20 "$dir/serve.log" >&2
    exit 1
fi
if grep -q "panicked" "$dir/serve.log"; then
    echo "FAIL: a handler panicked:" >&2
    grep -A3 "panicked" "$dir/serve.log" >&2
    exit 1
fi
curl -fsS -o /dev/null -H "Authorization: Bearer $token" "$base/api/v1/me" \
    || { echo "FAIL: the run's own token stopped working" >&2; exit 1; }
exit "$status"
