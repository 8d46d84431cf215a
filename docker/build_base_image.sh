#!/usr/bin/env bash
# Builds a local stand-in for python:3.11-slim where Docker Hub is out of
# reach: Debian bookworm (whose Python is 3.11) from debootstrap, with this
# machine's CA certificates (HTTPS to the package registry may pass a proxy
# with its own CA) and pip allowed to install system-wide.
# Usage: docker/build_base_image.sh [tag]   (default python:3.11-slim)
set -euo pipefail
tag="${1:-python:3.11-slim}"
if docker image inspect "$tag" >/dev/null 2>&1; then
  echo "base image $tag already present"; exit 0
fi
command -v debootstrap >/dev/null || {
  echo "error: debootstrap missing (apt-get install -y debootstrap)" >&2; exit 1; }
root="$(mktemp -d /tmp/sac-base.XXXXXX)"
trap 'rm -rf "$root" "$root.log"' EXIT
debootstrap --variant=minbase \
  --include=python3,python3-pip,python3-venv,python-is-python3,ca-certificates \
  bookworm "$root" >"$root.log" 2>&1 || {
  echo "error: debootstrap failed; last lines of $root.log:" >&2
  tail -n 20 "$root.log" >&2; exit 1; }
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
  cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
  chroot "$root" update-ca-certificates >/dev/null
fi
rm -f "$root"/usr/lib/python3*/EXTERNALLY-MANAGED
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | docker import -c 'CMD ["python3"]' - "$tag" >/dev/null
echo "built base image $tag"
