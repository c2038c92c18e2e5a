#!/usr/bin/env bash
# The packaging test (`just packaging-test`): installs the two .deb files into bare Debian
# containers and runs them the way their systemd units do, against a Postgres in a third
# container. Images are built offline from Debian's own packages (debootstrap, then
# `podman build --pull=never`); only Debian's package mirror is reached. Checked: the system
# users, modes, conffiles and unit contents; the agent running as outpost-agent with only
# CAP_SETUID/CAP_SETGID (as the unit grants them), enrolled, online at the control plane,
# `doctor` clean, the browser terminal (headless Chromium) running psql as the agent's role and
# `\!` as outpost-run, which cannot read the agent's credential, nor can a `command` task; a
# second dial of a live session with only the agent's credential refused and audited; a
# command and a VACUUM task done; an upgrade to a
# newer package while a task runs (identity, tasks and buffer kept, the task finishes `done`
# with its output); remove keeps data, purge removes it. Every container and network it makes
# is removed on exit, also on failure.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
debs=$root/target/debian
next=$root/target/debian-next
run=pkgtest-$$
net=$run
base=localhost/debian:bookworm

say() { printf '\n== %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }

# The images this test runs in, built offline; `packaging/test.sh --images` builds only them
# (`just test` does that early, beside the compile, while the network and the disk are idle).
build_images() {
    "$root/scripts/debian-base-image.sh"
    podman build --pull=never -q -t localhost/outpost-pkgtest-host -f - "$root/packaging" >/dev/null <<EOF
FROM $base
RUN apt-get update -q
EOF
    podman build --pull=never -q -t localhost/outpost-pkgtest-postgres -f - "$root/packaging" >/dev/null <<EOF
FROM $base
RUN apt-get update -q && apt-get install -y -q --no-install-recommends postgresql-15 >/dev/null \
 && echo "listen_addresses = '*'" >> /etc/postgresql/15/main/postgresql.conf \
 && echo "host all all 0.0.0.0/0 scram-sha-256" >> /etc/postgresql/15/main/pg_hba.conf
USER postgres
CMD ["/usr/lib/postgresql/15/bin/postgres", "-D", "/var/lib/postgresql/15/main", "-c", "config_file=/etc/postgresql/15/main/postgresql.conf"]
EOF
}
if [ "${1:-}" = --images ]; then
    build_images
    exit 0
fi

cleanup() {
    podman rm -f -t 0 "$run-pg" "$run-cp" "$run-agent" >/dev/null 2>&1 || true
    podman network rm -f "$net" >/dev/null 2>&1 || true
}
trap cleanup EXIT
trap 'echo "FAIL: line $LINENO: $BASH_COMMAND" >&2' ERR

for tool in podman debootstrap dpkg-deb systemd-analyze curl node; do
    command -v "$tool" >/dev/null || fail "$tool is missing (apt-get install podman runc debootstrap systemd curl nodejs)"
done
[ -d "$root/control-plane/web/node_modules/playwright-core" ] || fail "playwright-core is missing: run just web"
shopt -s nullglob
agent_debs=("$debs"/outpost-agent_*_amd64.deb)
cp_debs=("$debs"/outpost_*_amd64.deb)
next_debs=("$next"/outpost-agent_*_amd64.deb)
shopt -u nullglob
[ ${#agent_debs[@]} = 1 ] && [ ${#cp_debs[@]} = 1 ] || fail "expected one outpost-agent and one outpost package in $debs (just packages)"
[ ${#next_debs[@]} = 1 ] || fail "expected one newer outpost-agent package in $next (just packaging-test builds it)"
agent_deb=${agent_debs[0]}
cp_deb=${cp_debs[0]}
next_deb=${next_debs[0]}

say "units: systemd-analyze verify against the packaged files"
tree=$(mktemp -d)
trap 'cleanup; rm -rf "$tree"' EXIT
dpkg-deb -x "$agent_deb" "$tree"
dpkg-deb -x "$cp_deb" "$tree"
for unit in outpost-agent outpost; do
    # verify resolves ExecStart on this host: point it at the packaged binaries.
    sed "s|/usr/bin/|$tree/usr/bin/|" "$tree/usr/lib/systemd/system/$unit.service" > "$tree/$unit.service"
    out=$(systemd-analyze verify "$tree/$unit.service" 2>&1) || fail "systemd-analyze verify $unit: $out"
    [ -z "$out" ] || fail "systemd-analyze verify $unit warns: $out"
done
grep -qx 'KillMode=process' "$tree/usr/lib/systemd/system/outpost-agent.service" || fail "agent unit lacks KillMode=process"
grep -qx 'User=outpost-agent' "$tree/usr/lib/systemd/system/outpost-agent.service" || fail "agent unit lacks User="
grep -qx 'User=outpost' "$tree/usr/lib/systemd/system/outpost.service" || fail "control-plane unit lacks User="
grep -qx 'AmbientCapabilities=CAP_SETUID CAP_SETGID' "$tree/usr/lib/systemd/system/outpost-agent.service" || fail "agent unit lacks its two capabilities"
grep -qx 'CapabilityBoundingSet=CAP_SETUID CAP_SETGID' "$tree/usr/lib/systemd/system/outpost-agent.service" || fail "agent unit bounds more than two capabilities"
for unit in outpost-agent outpost; do
    grep -qx 'SystemCallFilter=@system-service' "$tree/usr/lib/systemd/system/$unit.service" || fail "$unit unit lacks SystemCallFilter"
    grep -qx 'ProtectProc=invisible' "$tree/usr/lib/systemd/system/$unit.service" || fail "$unit unit lacks ProtectProc"
done
echo "ok"

say "images (offline: debootstrap, podman build --pull=never)"
build_images
echo "ok"

say "containers: postgres, control plane, database host"
podman network create "$net" >/dev/null
podman run -d --name "$run-pg" --network "$net" localhost/outpost-pkgtest-postgres >/dev/null
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
podman run -d --name "$run-cp" --network "$net" -p "127.0.0.1:$port:8080" localhost/outpost-pkgtest-host sleep infinity >/dev/null
podman run -d --name "$run-agent" --network "$net" localhost/outpost-pkgtest-host sleep infinity >/dev/null
on() { local c=$1; shift; podman exec "$run-$c" "$@"; }
# What the agent unit gives: the user outpost-agent with CAP_SETUID and CAP_SETGID, ambient.
as_agent() {
    on agent setpriv --reuid=outpost-agent --regid=outpost-agent --init-groups \
        --inh-caps=+setuid,+setgid --ambient-caps=+setuid,+setgid --bounding-set=-all,+setuid,+setgid "$@"
}
for i in $(seq 1 60); do
    on pg psql -qAt -c 'SELECT 1' >/dev/null 2>&1 && break
    [ "$i" = 60 ] && fail "postgres did not start: $(podman logs "$run-pg" 2>&1 | tail -5)"
    sleep 0.5
done
on pg psql -q -c "CREATE ROLE outpost_agent LOGIN PASSWORD 'pkgtest-secret' IN ROLE pg_monitor"
echo "ok"

say "control plane: apt-get install ./outpost_*.deb, run as outpost"
podman cp "$cp_deb" "$run-cp:/tmp/"
on cp apt-get install -y -q "/tmp/$(basename "$cp_deb")" >/dev/null
[ "$(on cp stat -c '%a %U %G' /var/lib/outpost)" = "700 outpost outpost" ] || fail "control plane data dir"
[ "$(on cp stat -c '%a %U %G' /etc/outpost/outpost.toml)" = "640 root outpost" ] || fail "control plane config mode"
admin_password=pkgtest-admin-password
echo "$admin_password" | podman exec -i "$run-cp" setpriv --reuid=outpost --regid=outpost --init-groups \
    outpost admin create-user admin --role admin --password-stdin --data-dir /var/lib/outpost >/dev/null
on cp sh -c 'setpriv --reuid=outpost --regid=outpost --init-groups outpost serve --config /etc/outpost/outpost.toml --listen 0.0.0.0:8080 > /tmp/cp.log 2>&1 &'
for i in $(seq 1 60); do
    curl -fsS "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break
    [ "$i" = 60 ] && fail "control plane did not start: $(on cp cat /tmp/cp.log | tail -5)"
    sleep 0.5
done
token=$(on cp setpriv --reuid=outpost --regid=outpost --init-groups outpost admin enroll-token --data-dir /var/lib/outpost | tail -1)
echo "ok"

say "agent: apt-get install ./outpost-agent_*.deb"
podman cp "$agent_deb" "$run-agent:/tmp/"
on agent apt-get install -y -q "/tmp/$(basename "$agent_deb")" >/dev/null
on agent id outpost-agent >/dev/null || fail "no user outpost-agent"
on agent id outpost-run >/dev/null || fail "no user outpost-run"
[ "$(on agent stat -c '%a %U %G' /var/lib/outpost-run)" = "700 outpost-run outpost-run" ] || fail "run user's home"
on agent sh -c 'command -v psql && command -v pg_dump' >/dev/null || fail "postgresql-client not pulled in"
[ "$(on agent stat -c '%a %U %G' /var/lib/outpost-agent)" = "700 outpost-agent outpost-agent" ] || fail "agent data dir"
[ "$(on agent stat -c '%a %U %G' /etc/outpost/agent.toml)" = "640 root outpost-agent" ] || fail "agent config mode"
on agent dpkg-query -W -f='${Conffiles}\n' outpost-agent | grep -q '/etc/outpost/agent.toml' || fail "agent.toml is not a conffile"
echo "ok"

say "agent: enroll as outpost-agent, configure, run the way ExecStart does"
out=$(as_agent outpost-agent enroll --control-plane "http://$run-cp:8080" --token "$token" --data-dir /var/lib/outpost-agent 2>&1) \
    || fail "enroll: $out"
# A top-level key: above the file's [tasks] and [terminal] sections.
on agent sed -i "1i postgres = \"host=$run-pg user=outpost_agent password=pkgtest-secret dbname=postgres\"" /etc/outpost/agent.toml
start_agent() {
    on agent sh -c 'echo $$ > /run/outpost-agent.pid; exec setpriv --reuid=outpost-agent --regid=outpost-agent --init-groups --inh-caps=+setuid,+setgid --ambient-caps=+setuid,+setgid --bounding-set=-all,+setuid,+setgid /usr/bin/outpost-agent run --config /etc/outpost/agent.toml >> /tmp/agent.log 2>&1' &
    for i in $(seq 1 60); do
        on agent test -S /var/lib/outpost-agent/agent.sock && return 0
        sleep 0.5
    done
    fail "agent did not start: $(on agent tail -5 /tmp/agent.log)"
}
start_agent
agent_id() { on agent sed -n 's/.*"agent_id": *"\([^"]*\)".*/\1/p' /var/lib/outpost-agent/identity.json; }
agent_id=$(agent_id)
[ -n "$agent_id" ] || fail "no identity"
api_token=$(curl -fsS -H 'Content-Type: application/json' \
    -d "{\"username\":\"admin\",\"password\":\"$admin_password\"}" "http://127.0.0.1:$port/api/v1/sessions" \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["token"])') || fail "login to the control plane"
agents() { curl -fsS -H "Authorization: Bearer $api_token" "http://127.0.0.1:$port/api/v1/agents"; }
for i in $(seq 1 60); do
    agents | grep -q '"status":"online"' && break
    [ "$i" = 60 ] && fail "the agent is not online: $(agents)"
    sleep 0.5
done
echo "ok: enrolled and online"

say "doctor (as outpost-agent)"
as_agent outpost-agent doctor --config /etc/outpost/agent.toml || fail "doctor reports a failure"

say "terminal: headless Chromium opens psql on the packaged agent through the control plane"
shots=$root/target/tmp/browser-screenshots/packaging
mkdir -p "$shots"
OUTPOST_URL="http://127.0.0.1:$port" OUTPOST_USER=admin OUTPOST_PASSWORD="$admin_password" \
    OUTPOST_EXPECT_ROLE=outpost_agent OUTPOST_EXPECT_SHELL_USER=outpost-run \
    OUTPOST_CREDENTIAL=/var/lib/outpost-agent/identity.json OUTPOST_SCREENSHOTS="$shots" \
    node "$root/control-plane/web/tests/packaged.mjs" || fail "terminal (screenshots in $shots)"

say "terminal: a second dial of a live session with only the agent's credential"
session=$(curl -fsS -H "Authorization: Bearer $api_token" -H 'Content-Type: application/json' \
    -d "{\"agent_id\":\"$agent_id\"}" "http://127.0.0.1:$port/api/v1/terminal/sessions" \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["session_id"])') || fail "open a terminal session"
credential=$(on agent sed -n 's/.*"credential": *"\([^"]*\)".*/\1/p' /var/lib/outpost-agent/identity.json)
[ -n "$credential" ] || fail "no credential in identity.json"
dial=$(curl -sS -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $credential" \
    -H 'Connection: Upgrade' -H 'Upgrade: websocket' -H 'Sec-WebSocket-Version: 13' \
    -H 'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==' --max-time 10 \
    "http://127.0.0.1:$port/api/v1/agent/terminal/$session" || true)
[ "$dial" = 403 ] || fail "a second dial of session $session was answered $dial, not 403"
curl -fsS -H "Authorization: Bearer $api_token" "http://127.0.0.1:$port/api/v1/audit?action=terminal.link_refused" \
    | grep -q "\"target\":\"$session\"" || fail "the refused dial is not audited"
curl -fsS -X DELETE -H "Authorization: Bearer $api_token" "http://127.0.0.1:$port/api/v1/terminal/sessions/$session" >/dev/null
echo "ok: refused (403) and audited"

say "tasks: a command and a VACUUM, run as outpost-run"
tasks() { on agent outpost-agent tasks "$@"; }
wait_status() {
    for i in $(seq 1 120); do
        tasks show "$1" --data-dir /var/lib/outpost-agent | grep -qE "^status: +$2\$" && return 0
        sleep 0.5
    done
    fail "task $1 is not $2: $(tasks show "$1" --data-dir /var/lib/outpost-agent)"
}
id=$(tasks add command --key whoami --data-dir /var/lib/outpost-agent -- id -un)
wait_status "$id" done
[ "$(tasks logs "$id" --data-dir /var/lib/outpost-agent | head -1)" = "outpost-run" ] || fail "the task did not run as outpost-run"
id=$(tasks add command --key credential --data-dir /var/lib/outpost-agent -- cat /var/lib/outpost-agent/identity.json)
wait_status "$id" failed
tasks logs "$id" --data-dir /var/lib/outpost-agent | grep -q "Permission denied" || fail "a command task read the agent's credential"
id=$(tasks add vacuum --param database=postgres --data-dir /var/lib/outpost-agent)
wait_status "$id" done
echo "ok"

say "upgrade to a newer package while a task runs"
long=$(tasks add command --key long --data-dir /var/lib/outpost-agent -- sh -c 'sleep 4; echo finished after the upgrade')
wait_status "$long" doing
on agent sh -c 'kill -TERM "$(cat /run/outpost-agent.pid)"'
for i in $(seq 1 60); do
    on agent test -S /var/lib/outpost-agent/agent.sock || break
    sleep 0.25
done
podman cp "$next_deb" "$run-agent:/tmp/next.deb"
on agent apt-get install -y -q /tmp/next.deb >/dev/null
version=$(on agent dpkg-query -W -f='${Version}' outpost-agent)
[ "$version" = "$(dpkg-deb -f "$next_deb" Version)" ] || fail "upgraded to $version"
on agent grep -q "^postgres = " /etc/outpost/agent.toml || fail "the upgrade replaced the edited conffile"
start_agent
[ "$(agent_id)" = "$agent_id" ] || fail "identity changed"
on agent test -f /var/lib/outpost-agent/buffer.db || fail "the metrics buffer is gone"
wait_status "$long" done
tasks logs "$long" --data-dir /var/lib/outpost-agent | grep -q "finished after the upgrade" || fail "output of the adopted run"
[ "$(tasks list --data-dir /var/lib/outpost-agent | grep -c '^t_')" -ge 3 ] || fail "task history lost"
echo "ok: $version, the running task finished done across the upgrade"

say "remove keeps data, purge removes it"
on agent sh -c 'kill -TERM "$(cat /run/outpost-agent.pid)"'
sleep 1
on agent apt-get remove -y -q outpost-agent >/dev/null
on agent test -d /var/lib/outpost-agent || fail "remove deleted the data"
on agent id outpost-agent >/dev/null || fail "remove deleted the user"
on agent apt-get purge -y -q outpost-agent >/dev/null
on agent test ! -e /var/lib/outpost-agent || fail "purge kept the data"
on agent test ! -e /etc/outpost/agent.toml || fail "purge kept the config"
if on agent id outpost-agent >/dev/null 2>&1; then fail "purge kept the user"; fi
if on agent id outpost-run >/dev/null 2>&1; then fail "purge kept the run user"; fi
on agent test ! -e /var/lib/outpost-run || fail "purge kept the run user's home"
echo "ok"

say "packaging test passed"
