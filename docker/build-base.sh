#!/usr/bin/env bash
# Build the local CPU base image (Debian bookworm + python3 + venv) from Debian packages, for machines
# that reach no container registry: debootstrap a minimal root filesystem and `docker import` it.
# Skipped when the image is already there (it is the cache). Usage: docker/build-base.sh [TAG]
set -euo pipefail

tag=${1:-coop-base:bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

if docker image inspect "$tag" >/dev/null 2>&1; then
  exit 0
fi
root=$(mktemp -d /tmp/coop-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
echo "build-base: debootstrap bookworm into $root (a few minutes)"
# libstdc++6 and libgomp1: torch's CPU wheel links them; no ca-certificates: images install offline
debootstrap --variant=minbase --include=python3,python3-venv,libstdc++6,libgomp1 \
  bookworm "$root" "$mirror" >/dev/null
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | docker import --change 'CMD ["/bin/bash"]' - "$tag" >/dev/null
echo "build-base: $tag ready"
