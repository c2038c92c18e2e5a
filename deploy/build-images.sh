#!/usr/bin/env bash
# Builds the appliance's images with Podman and no registry: a Debian bookworm base from
# Debian's own packages (debootstrap), tagged as the `debian:bookworm-slim` the Dockerfiles
# name; PostgreSQL, Redis, nginx and Prometheus images from Debian's packages with the
# official images' contracts (deploy/test-images/); and the Outpost image: the Dockerfile's
# runtime stage on the binaries in target/release/ (cargo build --release after just web).
#
#   deploy/build-images.sh [TAG [VERSION]]   -> localhost/outpost:TAG (default latest)
#   deploy/build-images.sh --services        only the base and the third-party images
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
tag=${1:-latest}
version=${2:-$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/Cargo.toml" | head -1)}
base=localhost/debian:bookworm
services_only=false
if [ "${1:-}" = --services ]; then services_only=true; fi
for bin in outpost outpost-agent; do
    $services_only && break
    [ -x "$root/target/release/$bin" ] || { echo "target/release/$bin is missing: cargo build --release -p agent -p control-plane --bins" >&2; exit 1; }
done
"$root/scripts/debian-base-image.sh"
podman tag "$base" docker.io/library/debian:bookworm-slim
for image in postgres redis nginx prometheus; do
    podman build --pull=never -q -t "localhost/outpost-test-$image" "$root/deploy/test-images/$image" >/dev/null
done
if $services_only; then
    echo "images: localhost/outpost-test-{postgres,redis,nginx,prometheus}"
    exit 0
fi
podman build --pull=never --format docker --build-arg BINARIES=host --build-arg VERSION="$version" \
    -q -t "localhost/outpost:$tag" "$root" 2>&1 | grep -v -e 'systemd connection' -e '^[0-9a-f]\{64\}$' || true
podman image exists "localhost/outpost:$tag" || { echo "the outpost image was not built" >&2; exit 1; }
echo "images: localhost/outpost:$tag, localhost/outpost-test-{postgres,redis,nginx,prometheus}"
