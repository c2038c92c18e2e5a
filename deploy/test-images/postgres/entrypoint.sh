#!/bin/sh
# Initialises $PGDATA on first start (user, password, database and POSTGRES_HOST_AUTH_METHOD
# from the environment, as the official image reads them), then
# runs the server in the foreground, listening on every interface.
set -eu
auth=${POSTGRES_HOST_AUTH_METHOD:-scram-sha-256}
if [ "$auth" != trust ]; then
    : "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD must be set (or POSTGRES_HOST_AUTH_METHOD=trust)}"
fi
user=${POSTGRES_USER:-postgres}
db=${POSTGRES_DB:-$user}
data=${PGDATA:-/var/lib/postgresql/data}
bin=/usr/lib/postgresql/15/bin
if [ "$(id -u)" = 0 ]; then
    mkdir -p "$data" /var/run/postgresql
    chown postgres:postgres "$data" /var/run/postgresql
    chmod 700 "$data"
    exec setpriv --reuid=postgres --regid=postgres --init-groups "$0" "$@"
fi
if [ ! -s "$data/PG_VERSION" ]; then
    pwfile=$(mktemp)
    printf '%s\n' "${POSTGRES_PASSWORD:-}" > "$pwfile"
    if [ -n "${POSTGRES_PASSWORD:-}" ]; then pw="--pwfile=$pwfile"; else pw=""; fi
    "$bin/initdb" -D "$data" -U "$user" $pw --auth-local=trust --auth-host="$auth" >/dev/null
    rm -f "$pwfile"
    echo "host all all all $auth" >> "$data/pg_hba.conf"
    if [ "$db" != postgres ]; then
        "$bin/pg_ctl" -D "$data" -o "-c listen_addresses= -k /var/run/postgresql" -w start >/dev/null
        "$bin/createdb" -h /var/run/postgresql -U "$user" "$db"
        "$bin/pg_ctl" -D "$data" -m fast -w stop >/dev/null
    fi
    echo "postgres-entrypoint: initialised $data (user $user, database $db)"
fi
exec "$bin/postgres" -D "$data" -c listen_addresses='*' -k /var/run/postgresql
