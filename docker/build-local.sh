#!/bin/sh
# Build dwlab:gpu where no image registry is reachable but Debian's archive and the package index
# are (an air-gapped cluster's build host, or a host whose egress goes through a TLS proxy):
#   1. dwlab-base:bookworm: Debian bookworm (debootstrap --variant=minbase) with Debian's
#      Python 3.11 in a virtual environment on PATH: what python:3.11-slim-bookworm offers the
#      Dockerfile (python and a pip that installs into a writable environment).
#   2. dwlab:gpu from docker/Dockerfile on that base, the host's CA bundle handed to pip as a
#      BuildKit secret (mounted for the pip steps only, in no layer) and the host's network.
#   3. dwlab-postgres:15 (docker/postgres.Dockerfile) on that base: PostgreSQL from Debian's
#      packages in place of postgres:16.6 (compose: POSTGRES_IMAGE=dwlab-postgres:15).
# Run from the repository root, as root (debootstrap, only while the base does not exist):
#   sh docker/build-local.sh
# Environment:
#   BASE_IMAGE     a Python 3.11 base to use instead (e.g. python:3.11.11-slim-bookworm from a
#                  registry): steps 1 and 3 are skipped
#   DOCKER         the client (default docker); it must build with BuildKit: Docker >= 23 with
#                  its buildx plugin, or Debian's docker.io 20.10 client (/usr/bin/docker)
#   PIP_CA_BUNDLE  the CA bundle pip trusts (default: pip's `global.cert`, else
#                  /etc/ssl/certs/ca-certificates.crt; none passed when the file is absent)
#   DWLAB_TAG      default dwlab:gpu;  DEBIAN_MIRROR  default http://deb.debian.org/debian
set -eu

docker=${DOCKER:-docker}
tag=${DWLAB_TAG:-dwlab:gpu}
base=${BASE_IMAGE:-dwlab-base:bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
ca=${PIP_CA_BUNDLE:-$(pip config get global.cert 2>/dev/null || echo /etc/ssl/certs/ca-certificates.crt)}
[ -f docker/Dockerfile ] || { echo "error: run from the repository root (no docker/Dockerfile in $PWD)" >&2; exit 2; }
size() { $docker image inspect -f '{{.Size}}' "$1" | awk '{printf "%.2f GB", $1 / 1e9}'; }

if [ -z "${BASE_IMAGE:-}" ] && ! $docker image inspect "$base" >/dev/null 2>&1; then
    command -v debootstrap >/dev/null || { echo "error: debootstrap is not installed (apt-get install debootstrap)" >&2; exit 2; }
    rootfs=$(mktemp -d)
    trap 'rm -rf "$rootfs"' EXIT
    nice -n 5 debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$rootfs" "$mirror"
    chroot "$rootfs" python3 -m venv /opt/python
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb
    tar -C "$rootfs" -c . | $docker import \
        --change 'ENV PATH=/opt/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["python3"]' \
        - "$base"
    echo "made $base: $(size "$base")"
fi

set -- --network host --build-arg BASE_IMAGE="$base"
[ -f "$ca" ] && set -- "$@" --secret id=pip-ca,src="$ca"
start=$(date +%s)
DOCKER_BUILDKIT=1 nice -n 5 $docker build "$@" -f docker/Dockerfile -t "$tag" .
echo "built $tag in $(($(date +%s) - start)) s: $(size "$tag")"
if [ -z "${BASE_IMAGE:-}" ]; then
    DOCKER_BUILDKIT=1 nice -n 5 $docker build --network host --build-arg BASE_IMAGE="$base" \
        -f docker/postgres.Dockerfile -t dwlab-postgres:15 docker
    echo "built dwlab-postgres:15: $(size dwlab-postgres:15)"
fi
