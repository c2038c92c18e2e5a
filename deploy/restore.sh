#!/bin/sh
# Restores a backup made by backup.sh into this stack, then starts it. Meant for a fresh
# stack (new volumes) or one whose data is lost: the database is replaced as a whole.
# Agents enrolled before the backup reconnect with their credentials, and trust the
# restored CA.
#
#   ./restore.sh DIR                       (docker compose)
#   COMPOSE="podman-compose" ./restore.sh DIR
set -eu
[ $# = 1 ] || { echo "usage: $0 DIR" >&2; exit 2; }
cd "$(dirname "$0")"
dir=$1
[ -s "$dir/outpost.dump" ] && [ -s "$dir/certs.tar" ] || { echo "$dir lacks outpost.dump or certs.tar (backup.sh makes both)" >&2; exit 1; }
# A backup others can read has leaked its secrets already (the CA key, password hashes):
# refuse it rather than restore a CA that may be in other hands.
for f in "$dir" "$dir/outpost.dump" "$dir/certs.tar"; do
    mode=$(stat -L -c %a "$f")
    if [ $((0$mode & 077)) != 0 ]; then
        echo "$f is mode $mode: group and others can read the backup's secrets. If nobody else had access, chmod 700 $dir and 600 its files, then run again; otherwise treat the CA and passwords as leaked" >&2
        exit 1
    fi
done
compose=${COMPOSE:-docker compose}
$compose up -d postgres
i=0
until $compose exec -T postgres pg_isready -q -U outpost -d outpost; do
    i=$((i + 1))
    [ "$i" -lt 60 ] || { echo "postgres did not become ready in 60 s" >&2; exit 1; }
    sleep 1
done
$compose exec -T postgres pg_restore -U outpost -d outpost --clean --if-exists --no-owner --exit-on-error < "$dir/outpost.dump"
$compose run --rm --no-deps -T tls-init sh -c 'rm -rf /certs/* && tar -C /certs -xf -' < "$dir/certs.tar"
$compose up -d
echo "restored from $dir"
