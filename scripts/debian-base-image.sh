#!/usr/bin/env bash
# Makes the Debian bookworm base image every container test builds on, with no registry:
# debootstrap (minbase) from Debian's own package mirror, imported as localhost/debian:bookworm.
# Does nothing when the image exists. Used by the packaging, appliance and fresh-demo tests.
#
#   scripts/debian-base-image.sh      (OUTPOST_DEBIAN_MIRROR overrides the mirror)
set -euo pipefail
base=localhost/debian:bookworm
mirror=${OUTPOST_DEBIAN_MIRROR:-http://deb.debian.org/debian}
podman image exists "$base" && exit 0
echo "debootstrap: a Debian bookworm base image from $mirror (about a minute, once)"
rootfs=$(mktemp -d)
trap 'rm -rf "$rootfs"' EXIT
debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >/dev/null
tar -C "$rootfs" -c . | podman import - "$base" >/dev/null
