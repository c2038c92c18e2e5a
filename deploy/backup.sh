#!/bin/sh
# Backs up the appliance's control-plane data while it runs, into DIR (created):
#   outpost.dump  the database (pg_dump: one consistent snapshot; users, agents and their
#                 credentials, tasks, metrics, audit)
#   certs.tar     the certs volume (the private CA agents trust, and the certificate)
# Redis holds only live terminal streams and is not backed up.
# Both files hold secrets (password hashes, the replicas' signing key, the CA's private key):
# the directory is made 0700 and the files 0600, whatever the caller's umask.
#
#   ./backup.sh DIR                       (docker compose)
#   COMPOSE="podman-compose" ./backup.sh DIR
set -eu
[ $# = 1 ] || { echo "usage: $0 DIR" >&2; exit 2; }
cd "$(dirname "$0")"
dir=$1
compose=${COMPOSE:-docker compose}
umask 077
mkdir -p "$dir"
chmod 700 "$dir"
$compose exec -T postgres pg_dump -U outpost -d outpost --format=custom > "$dir/outpost.dump.tmp"
mv "$dir/outpost.dump.tmp" "$dir/outpost.dump"
$compose run --rm --no-deps -T tls-init tar -C /certs -cf - . > "$dir/certs.tar.tmp"
mv "$dir/certs.tar.tmp" "$dir/certs.tar"
chmod 600 "$dir/outpost.dump" "$dir/certs.tar"
echo "backup in $dir: $(du -k "$dir/outpost.dump" | cut -f1) KiB database, $(tar -tf "$dir/certs.tar" | grep -c -v '/$') certificate files"
