#!/bin/sh
# Base images for an offline (air-gapped) build, made from Debian's packages when no container
# registry answers (docs/docker.md, "Offline build"). Needs root, debootstrap and a Debian mirror.
#
#   sudo sh docker/make_base_images.sh
#   docker build -f docker/Dockerfile --build-arg BASE_IMAGE=perl-base/python:3.11-bookworm ...
#
#   PERL_BASE_IMAGE      the Python base (default perl-base/python:3.11-bookworm): Debian bookworm
#                        minbase + python3 3.11, python3-venv, ca-certificates and git
#   PERL_POSTGRES_IMAGE  the PostgreSQL stand-in (default perl-base/postgres:15-bookworm): Debian's
#                        postgresql-15 behind docker/postgres/entrypoint.sh, which does what the
#                        official image's entrypoint does for docker/compose.yaml
#   DEBIAN_MIRROR        the mirror debootstrap reads (default http://deb.debian.org/debian)
#   DOCKER               the docker client (default: docker)
# An image that already exists is kept: delete it (docker rmi) to make it again.
set -eu
python_image=${PERL_BASE_IMAGE:-perl-base/python:3.11-bookworm}
postgres_image=${PERL_POSTGRES_IMAGE:-perl-base/postgres:15-bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
docker=${DOCKER:-docker}
here=$(cd "$(dirname "$0")" && pwd)

work=$(mktemp -d /var/tmp/perl-base.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir "$work/debs"  # one download of the shared packages for both images

# rootfs NAME PACKAGES: a bookworm minbase in $work/NAME with PACKAGES, no apt lists or caches
rootfs() {
    debootstrap --variant=minbase --cache-dir="$work/debs" --include="$2" bookworm "$work/$1" "$mirror" >"$work/$1.log" 2>&1 \
        || { tail -20 "$work/$1.log" >&2; echo "make_base_images.sh: debootstrap failed ($1)" >&2; exit 1; }
    # The host's own certificate authorities (a TLS-inspecting proxy, an internal mirror), if any.
    if [ -x "$work/$1/usr/sbin/update-ca-certificates" ] && [ -n "$(ls /usr/local/share/ca-certificates 2>/dev/null)" ]; then
        cp -r /usr/local/share/ca-certificates/. "$work/$1/usr/local/share/ca-certificates/"
        chroot "$work/$1" update-ca-certificates >/dev/null
    fi
    rm -rf "$work/$1/var/lib/apt/lists/"* "$work/$1/var/cache/apt/"*.bin "$work/$1/var/cache/apt/archives/"*.deb
}

# import_rootfs NAME IMAGE [--change ...]: the rootfs as a one-layer image
import_rootfs() {
    name=$1 image=$2
    shift 2
    tar -C "$work/$name" --numeric-owner -c . | "$docker" import "$@" - "$image" >/dev/null
    echo "make_base_images.sh: $image ($("$docker" image inspect --format '{{.Size}}' "$image" | awk '{printf "%d MB", $1/1e6}'))"
}

exists() { "$docker" image inspect "$1" >/dev/null 2>&1; }

if exists "$python_image"; then
    echo "make_base_images.sh: $python_image exists, kept"
else
    rootfs python python3,python3-venv,ca-certificates,git
    # Debian marks its Python as externally managed (PEP 668); the official python image does not,
    # and the Dockerfile installs into venvs only.
    rm -f "$work"/python/usr/lib/python3.*/EXTERNALLY-MANAGED
    import_rootfs python "$python_image" --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]'
fi

if exists "$postgres_image"; then
    echo "make_base_images.sh: $postgres_image exists, kept"
else
    rootfs postgres postgresql-15
    # Debian's package made a cluster `main`; the entrypoint makes one in PGDATA instead.
    rm -rf "$work"/postgres/var/lib/postgresql/15 "$work"/postgres/etc/postgresql/15
    install -m 0755 "$here/postgres/entrypoint.sh" "$work/postgres/usr/local/bin/docker-entrypoint.sh"
    mkdir -p "$work/postgres/docker-entrypoint-initdb.d"
    import_rootfs postgres "$postgres_image" \
        --change 'ENV PATH=/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' --change 'ENV PGDATA=/var/lib/postgresql/data' \
        --change 'EXPOSE 5432' \
        --change 'ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]' --change 'CMD ["postgres"]'
fi
