#!/usr/bin/env bash
# The appliance test (`just appliance-test`): builds the images offline (a Debian base from
# debootstrap, `podman build --pull=never`, the Outpost image's runtime stage on host-built
# binaries), brings deploy/docker-compose.yml up with podman-compose and the `demo` profile,
# and checks through the TLS proxy: first admin, the demo agent online with metrics, a task
# run through the API, the psql terminal in headless Chromium; kill -9 of the replica holding
# the agent's channel (agent and terminal come back through the other replica); down and up
# on a newer image with all data kept; a backup taken while running, restored after the
# control plane's volumes are deleted, with the agent reconnecting on its old credentials.
# Also: the alert rules (promtool), a missing secret, a certificate that does not match its key.
# Every container, volume and network it makes is removed on exit, also on failure.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
deploy=$root/deploy
base=localhost/debian:bookworm
project=apptest$$
work=$(mktemp -d)
env_file=$work/.env
profiles="--profile demo"
# shellcheck disable=SC2086 # $profiles is a list of flags
compose() { podman-compose --env-file "$env_file" $profiles "$@"; }
export COMPOSE="podman-compose --env-file $env_file --profile demo"
# Podman without systemd cannot schedule health checks and says so on every container start.
quiet() { grep -v -e 'systemd connection' -e '^[0-9a-f]\{64\}$' || true; }

say() { printf '\n== %s\n' "$*"; }
# The services' last log lines, so a CI failure can be read without the stack.
dump_logs() {
    for service in control-plane-1 control-plane-2 demo-agent proxy; do
        podman container exists "${project}_${service}_1" 2>/dev/null || continue
        echo "--- last log lines of $service:" >&2
        podman logs --tail 40 "${project}_${service}_1" 2>&1 | sed 's/^/    /' >&2
    done
}
fail() { printf 'FAIL: %s\n' "$*" >&2; dump_logs; exit 1; }
now_ms() { date +%s%3N; }

cleanup() {
    set +e
    if [ -n "${node_pid:-}" ]; then kill "$node_pid" 2>/dev/null; fi
    (cd "$deploy" && compose down -v -t 1) >/dev/null 2>&1
    podman ps -a --format '{{.Names}}' | grep "^${project}_" | xargs -r podman rm -f -t 0 >/dev/null 2>&1
    podman volume ls --format '{{.Name}}' | grep "^${project}_" | xargs -r podman volume rm -f >/dev/null 2>&1
    podman network ls --format '{{.Name}}' | grep "^${project}_" | xargs -r podman network rm -f >/dev/null 2>&1
    rm -rf "$work"
}
trap cleanup EXIT
trap 'echo "FAIL: line $LINENO: $BASH_COMMAND" >&2' ERR

for tool in podman podman-compose debootstrap promtool curl node openssl python3; do
    command -v "$tool" >/dev/null || fail "$tool is missing (apt-get install podman runc debootstrap prometheus curl nodejs openssl; pip install podman-compose)"
done
[ -d "$root/control-plane/web/node_modules/playwright-core" ] || fail "playwright-core is missing: run just web"
for bin in outpost outpost-agent; do
    [ -x "$root/target/release/$bin" ] || fail "target/release/$bin is missing: cargo build --release (just appliance-test does)"
done

say "alert rules: promtool"
promtool check rules "$deploy/alerts/outpost.rules.yml" >/dev/null
(cd "$deploy/alerts" && promtool test rules outpost.rules.test.yml >/dev/null) || fail "promtool test rules"
promtool check config --syntax-only "$deploy/prometheus.yml" >/dev/null
echo "ok"

say "images (offline: debootstrap, podman build --pull=never)"
build_start=$(now_ms)
"$deploy/build-images.sh" apptest >/dev/null
"$deploy/build-images.sh" apptest-next 0.1.0-next >/dev/null
podman image exists localhost/outpost:apptest || fail "the outpost image was not built"
size() { podman image inspect "$1" --format '{{.Size}}' | awk '{printf "%d MB", $1 / 1000000}'; }
echo "ok in $(( ($(now_ms) - build_start) / 1000 )) s: outpost $(size localhost/outpost:apptest) (base $(size "$base")), postgres $(size localhost/outpost-test-postgres), redis $(size localhost/outpost-test-redis), nginx $(size localhost/outpost-test-nginx)"

say "bad input: a missing secret, a certificate that does not match its key"
cd "$deploy"
: > "$env_file"
out=$(podman-compose --env-file "$env_file" config 2>&1) && fail "compose accepted an empty .env"
grep -q "POSTGRES_PASSWORD" <<<"$out" || fail "the error does not name POSTGRES_PASSWORD: $out"
mkdir -p "$work/supplied" "$work/certs-out"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 -subj /CN=a \
    -keyout "$work/supplied/tls.key" -out "$work/supplied/tls.crt" 2>/dev/null
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 -subj /CN=b \
    -keyout "$work/other.key" -out "$work/other.crt" 2>/dev/null
cp "$work/other.key" "$work/supplied/tls.key"
chown -R 10001:10001 "$work/certs-out" "$work/supplied"
out=$(podman run --rm -v "$work/supplied:/supplied:ro" -v "$work/certs-out:/certs" localhost/outpost:apptest outpost-tls-init 2>&1) \
    && fail "tls-init accepted a key that does not match"
grep -q "does not match" <<<"$out" || fail "tls-init did not say what is wrong: $out"
grep -q "does not match" "$work/certs-out/error" || fail "tls-init left no error for the proxy"
echo "ok: $(tail -1 <<<"$out")"

say "up: podman-compose up -d (profile demo)"
https_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat > "$env_file" <<EOF
OUTPOST_PROJECT=$project
POSTGRES_PASSWORD=$(openssl rand -hex 16)
REDIS_PASSWORD=$(openssl rand -hex 16)
DEMO_POSTGRES_PASSWORD=$(openssl rand -hex 16)
OUTPOST_HOSTNAME=localhost
OUTPOST_BIND=127.0.0.1
OUTPOST_HTTPS_PORT=$https_port
OUTPOST_IMAGE=localhost/outpost:apptest
OUTPOST_POSTGRES_IMAGE=localhost/outpost-test-postgres
OUTPOST_REDIS_IMAGE=localhost/outpost-test-redis
OUTPOST_PROXY_IMAGE=localhost/outpost-test-nginx
OUTPOST_PROMETHEUS_IMAGE=localhost/outpost-test-prometheus
EOF
url=https://localhost:$https_port
ca=$work/ca.crt
up_start=$(now_ms)
compose up -d 2>&1 | quiet
c() { echo "${project}_$1_1"; }
for i in $(seq 1 120); do
    compose exec -T proxy cat /certs/ca.crt > "$ca" 2>/dev/null && curl -fsS --cacert "$ca" "$url/healthz" 2>/dev/null | grep -q '"reachable":true' && break
    [ "$i" = 120 ] && fail "no healthy answer through the proxy: $(podman logs --tail 5 "$(c proxy)" 2>&1; podman logs --tail 5 "$(c control-plane-1)" 2>&1)"
    sleep 0.5
done
healthy_ms=$(( $(now_ms) - up_start ))
for replica in control-plane-1 control-plane-2; do
    for i in $(seq 1 60); do
        podman healthcheck run "$(c $replica)" >/dev/null 2>&1 && break
        [ "$i" = 60 ] && fail "HEALTHCHECK of $replica: $(podman logs --tail 5 "$(c $replica)" 2>&1)"
        sleep 0.5
    done
done
echo "ok: healthy through https in $healthy_ms ms; both replicas pass their HEALTHCHECK"

say "first admin: compose exec control-plane-1 outpost admin create-user"
admin_password=$(openssl rand -hex 12)
echo "$admin_password" | compose exec -T control-plane-1 outpost admin create-user admin --role admin --password-stdin >/dev/null
login() {
    curl -fsS --cacert "$ca" -H 'Content-Type: application/json' \
        -d "{\"username\":\"admin\",\"password\":\"$admin_password\"}" "$url/api/v1/sessions" \
        | python3 -c 'import json, sys; print(json.load(sys.stdin)["token"])'
}
token=$(login) || fail "login through the proxy"
api() { curl -fsS --cacert "$ca" -H "Authorization: Bearer $token" "$@"; }
agent_field() { api "$url/api/v1/agents" | python3 -c "import json, sys; a = [x for x in json.load(sys.stdin) if x['name'] == 'demo-db']; print(a[0]['$1'] if a else '')"; }
wait_online() {
    for i in $(seq 1 "$1"); do
        [ "$(agent_field status)" = online ] && return 0
        sleep 0.5
    done
    return 1
}
wait_online 120 || fail "the demo agent is not online: $(api "$url/api/v1/agents"; podman logs --tail 5 "$(c demo-agent)" 2>&1)"
agent_id=$(agent_field id)
echo "ok: admin logs in over TLS; demo agent $agent_id online $(( ($(now_ms) - up_start) / 1000 )) s after up"

say "metrics arrive"
metric_rows() { api "$url/api/v1/agents/$agent_id/metrics" | python3 -c 'import json, sys; d = json.load(sys.stdin); print(len(d) if isinstance(d, list) else sum(len(v) for v in d.values() if isinstance(v, list)))'; }
for i in $(seq 1 120); do
    [ "$(metric_rows)" -gt 0 ] && break
    [ "$i" = 120 ] && fail "no metrics from the demo agent: $(api "$url/api/v1/agents/$agent_id/metrics" | head -c 300)"
    sleep 0.5
done
echo "ok: $(metric_rows) series/rows stored"

say "tasks through the API, whichever replica takes the request"
task_ids=()
for n in 1 2 3 4; do
    id=$(api -H 'Content-Type: application/json' -d "{\"kind\":\"command\",\"key\":\"apptest-$n\",\"argv\":[\"echo\",\"run $n\"]}" \
        "$url/api/v1/agents/$agent_id/tasks" | python3 -c 'import json, sys; print(json.load(sys.stdin)["id"])') \
        || fail "task $n was refused"
    task_ids+=("$id")
done
task_status() { api "$url/api/v1/agents/$agent_id/tasks" | python3 -c "import json, sys; print(next((t['status'] for t in json.load(sys.stdin) if t['id'] == '$1'), ''))"; }
for id in "${task_ids[@]}"; do
    for i in $(seq 1 60); do
        [ "$(task_status "$id")" = done ] && break
        [ "$i" = 60 ] && fail "task $id is $(task_status "$id")"
        sleep 0.5
    done
done
echo "ok: ${#task_ids[@]} tasks created through the proxy ran done"

say "terminal in headless Chromium; kill -9 the replica holding the agent's channel"
shots=$root/target/tmp/browser-screenshots/appliance
mkdir -p "$shots"
spki=$(podman exec "$(c proxy)" cat /certs/tls.crt | openssl x509 -noout -pubkey | openssl pkey -pubin -outform der | openssl dgst -sha256 -binary | base64)
signal=$work/failover-done
OUTPOST_URL=$url OUTPOST_USER=admin OUTPOST_PASSWORD="$admin_password" OUTPOST_SPKI="$spki" \
    OUTPOST_SCREENSHOTS="$shots" OUTPOST_FAILOVER_DONE="$signal" \
    node "$root/control-plane/web/tests/appliance.mjs" > "$work/node.log" 2>&1 &
node_pid=$!
for i in $(seq 1 120); do
    grep -q '^ready' "$work/node.log" && break
    kill -0 "$node_pid" 2>/dev/null || fail "browser: $(cat "$work/node.log") (screenshots in $shots)"
    sleep 0.5
done
grep -q '^ready' "$work/node.log" || fail "the terminal did not open: $(cat "$work/node.log")"
connected_on() { podman logs "$(c "$1")" 2>&1 | grep -c 'agent connected' || true; }
holder=""
for replica in control-plane-1 control-plane-2; do
    # The replica whose log has the most recent `agent connected` without a later disconnect.
    last=$(podman logs "$(c $replica)" 2>&1 | grep -E 'agent (connected|disconnected)' | tail -1 || true)
    if grep -q 'agent connected' <<<"$last"; then holder=$replica; fi
done
[ -n "$holder" ] || fail "no replica holds the agent's channel"
other=control-plane-1
[ "$holder" = control-plane-1 ] && other=control-plane-2
before_other=$(connected_on "$other")
agent_started=$(podman inspect "$(c demo-agent)" --format '{{.State.StartedAt}}')
kill_start=$(now_ms)
podman kill -s KILL "$(c "$holder")" >/dev/null
for i in $(seq 1 240); do
    [ "$(connected_on "$other")" -gt "$before_other" ] && break
    [ "$i" = 240 ] && fail "the agent did not reconnect to $other: $(podman logs --tail 10 "$(c demo-agent)" 2>&1)"
    sleep 0.25
done
back_ms=$(( $(now_ms) - kill_start ))
# A login right after the kill, as a user would: retried like a browser retries, and each
# refusal reported (the proxy should pass it to the live replica at once).
refused_logins=0
until token=$(login 2>/dev/null); do
    refused_logins=$((refused_logins + 1))
    [ "$refused_logins" -lt 5 ] || fail "login through the proxy fails after the kill: $(podman logs --tail 10 "$(c proxy)" 2>&1)"
    echo "login refused after the kill ($refused_logins): $(podman logs --tail 2 "$(c proxy)" 2>&1 | tail -1)"
    sleep 1
done
wait_online 60 || fail "the agent is not shown online after the failover"
[ "$(podman inspect "$(c demo-agent)" --format '{{.State.StartedAt}}')" = "$agent_started" ] || fail "the agent container was restarted"
touch "$signal"
wait "$node_pid" || fail "browser after the failover: $(cat "$work/node.log") (screenshots in $shots)"
node_pid=""
reattach_ms=$(( $(now_ms) - kill_start ))
podman start "$(c "$holder")" 2>&1 | quiet >/dev/null
echo "ok: killed $holder; the agent was back on $other in $back_ms ms without a restart; the same terminal session answered again $reattach_ms ms after the kill; logins refused on the way: $refused_logins"

say "/metrics names every series the alert rules use"
token=$(login)
api "$url/metrics" > "$work/metrics.txt"
for name in $(grep -o 'outpost_[a-z_]*' "$deploy/alerts/outpost.rules.yml" | sort -u); do
    grep -q "^# TYPE $name " "$work/metrics.txt" || fail "/metrics has no $name"
done
grep -q '^outpost_terminal_store_up 1' "$work/metrics.txt" || fail "terminal store not up"
echo "ok"

say "profile metrics: Prometheus scrapes both replicas with a viewer's token and loads the rules"
openssl rand -hex 12 | compose exec -T control-plane-1 outpost admin create-user prometheus --role viewer --password-stdin >/dev/null
compose exec -T control-plane-1 outpost admin api-token prometheus --ttl 30d | tail -1 | tr -d '\r' > "$work/metrics-token"
chmod 0644 "$work/metrics-token"
prom_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
printf 'OUTPOST_METRICS_TOKEN_FILE=%s\nOUTPOST_PROMETHEUS_PORT=%s\n' "$work/metrics-token" "$prom_port" >> "$env_file"
profiles="--profile demo --profile metrics"
export COMPOSE="podman-compose --env-file $env_file $profiles"
compose up -d prometheus 2>&1 | quiet
targets_up() {
    curl -fsS "http://127.0.0.1:$prom_port/api/v1/targets" 2>/dev/null \
        | python3 -c 'import json, sys; t = json.load(sys.stdin)["data"]["activeTargets"]; print(sum(x["health"] == "up" for x in t))' 2>/dev/null || echo 0
}
for i in $(seq 1 180); do
    [ "$(targets_up)" = 2 ] && break
    [ "$i" = 180 ] && fail "Prometheus does not scrape both replicas: $(curl -fsS "http://127.0.0.1:$prom_port/api/v1/targets" | head -c 600)"
    sleep 0.5
done
rules=$(curl -fsS "http://127.0.0.1:$prom_port/api/v1/rules" | python3 -c 'import json, sys; print(sum(len(g["rules"]) for g in json.load(sys.stdin)["data"]["groups"]))')
[ "$rules" = "$(grep -c -- '- alert:' "$deploy/alerts/outpost.rules.yml")" ] || fail "Prometheus loaded $rules rules"
echo "ok: both replicas up in Prometheus, $rules alert rules loaded"

say "backup while running"
(umask 022 && ./backup.sh "$work/backup") 2>&1 | quiet
modes=$(stat -c '%a' "$work/backup" "$work/backup/outpost.dump" "$work/backup/certs.tar" | tr '\n' ' ')
[ "$modes" = "700 600 600 " ] || fail "the backup's modes are $modes, not 700 600 600"
cp -a "$work/backup" "$work/backup-open" && chmod 755 "$work/backup-open"
if ./restore.sh "$work/backup-open" >"$work/restore-open.log" 2>&1; then fail "restore.sh took a backup others can read"; fi
grep -q "group and others can read" "$work/restore-open.log" || fail "restore.sh refused without saying why: $(cat "$work/restore-open.log")"
echo "ok: the backup is 0700/0600 under umask 022, and a readable copy is refused"
audit_count() { api "$url/api/v1/audit?limit=500" | python3 -c 'import json, sys; print(len(json.load(sys.stdin)))'; }
audit_before=$(audit_count)
rows_before=$(metric_rows)
echo "ok: audit $audit_before records, metrics $rows_before"

say "down, then up on a newer image: everything kept, migrations once"
compose down -t 5 2>&1 | quiet >/dev/null
sed -i 's|^OUTPOST_IMAGE=.*|OUTPOST_IMAGE=localhost/outpost:apptest-next|' "$env_file"
compose up -d 2>&1 | quiet
for i in $(seq 1 120); do
    curl -fsS --cacert "$ca" "$url/healthz" >/dev/null 2>&1 && break
    [ "$i" = 120 ] && fail "not healthy after up"
    sleep 0.5
done
[ "$(podman inspect "$(c control-plane-2)" --format '{{.ImageName}}')" = localhost/outpost:apptest-next ] || fail "replica 2 runs $(podman inspect "$(c control-plane-2)" --format '{{.ImageName}}')"
token=$(login) || fail "the admin is gone after down/up"
wait_online 120 || fail "the agent did not come back after down/up"
[ "$(audit_count)" -ge "$audit_before" ] || fail "audit records lost"
[ "$(metric_rows)" -gt 0 ] || fail "metrics lost"
migrations=$(compose exec -T postgres psql -U outpost -d outpost -At -F ' ' -c 'SELECT count(*), count(DISTINCT version) FROM schema_migrations' | tr -d '\r')
[ "${migrations% *}" = "${migrations#* }" ] || fail "schema_migrations: $migrations"
echo "ok: admin, agent, audit ($(audit_count)), metrics and tasks kept; $migrations migrations, each once"

say "restore: delete the control plane's data, restore the backup, the agent reconnects"
compose down -t 5 2>&1 | quiet >/dev/null
podman volume rm "${project}_postgres-data" "${project}_certs" >/dev/null
./restore.sh "$work/backup" 2>&1 | quiet
for i in $(seq 1 120); do
    curl -fsS --cacert "$ca" "$url/healthz" >/dev/null 2>&1 && break
    [ "$i" = 120 ] && fail "not healthy after the restore (is the restored CA the old one?)"
    sleep 0.5
done
token=$(login) || fail "the admin is gone after the restore"
[ "$(agent_field id)" = "$agent_id" ] || fail "the agent is not in the restored data"
wait_online 120 || fail "the agent did not reconnect with its credentials: $(podman logs --tail 5 "$(c demo-agent)" 2>&1)"
[ "$(audit_count)" -ge "$audit_before" ] || fail "audit records missing after the restore"
echo "ok: restored; agent $agent_id online again on its old credentials"

# Name lookups the container network's DNS did not answer in time, dialed at their last
# answer instead (the world seam's stale answers): counted, so a run shows how often.
stale=0
for service in control-plane-1 control-plane-2 demo-agent; do
    n=$(podman logs "$(c $service)" 2>&1 | grep -c 'using its last answer' || true)
    stale=$((stale + n))
done
echo "name lookups dialed at their last answer (DNS too slow or failing), in the last containers' logs: $stale"

say "appliance test passed: healthy in $healthy_ms ms, agent back in $back_ms ms after kill -9 of $holder"
