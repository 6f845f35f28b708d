#!/usr/bin/env bash
# Builds the pgwarden image without any container registry:
#   1. the base image (Debian bookworm + PostgreSQL 15 + the postgres user, uid 999) from a
#      debootstrap root file system, imported with `docker import`; reused when its tag exists;
#   2. pgwarden, built on the host in release mode (or --binary);
#   3. the image: docker/Dockerfile, target `host`, on that base (its `runtime` stage tagged
#      <base>-runtime, so that it stays cached).
# Needs docker, cargo, and for step 1 root, debootstrap and Debian's package mirror.
#
# usage: docker/build-offline.sh [--image TAG] [--base TAG] [--rebuild-base] [--binary PATH]
# environment: DEBIAN_MIRROR (http://deb.debian.org/debian),
#              DEBIAN_SECURITY_MIRROR (http://deb.debian.org/debian-security)
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
image=pgwarden:dev
# Bump the revision when the recipe below changes, so that cached bases are not reused.
base=pgwarden-base:bookworm-pg15-r1
suite=bookworm
pg_major=15
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
security_mirror=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
rebuild_base=0
binary=

while [ $# -gt 0 ]; do
  case "$1" in
    --image) image=$2; shift 2 ;;
    --base) base=$2; shift 2 ;;
    --rebuild-base) rebuild_base=1; shift ;;
    --binary) binary=$2; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done

log() { printf '[build-offline %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf '[build-offline] error: %s\n' "$*" >&2; exit 1; }
elapsed() { echo "$(( $(date +%s) - $1 ))s"; }

command -v docker >/dev/null || die "docker is not installed"
docker version --format '{{.Server.Version}}' >/dev/null 2>&1 \
  || die "cannot reach the Docker engine (is it running, may this user use it?)"

work=$(mktemp -d "${TMPDIR:-/var/tmp}/pgwarden-build.XXXXXX")
rootfs=$work/rootfs
proc_mounted=0
cleanup() {
  if [ "$proc_mounted" = 1 ]; then umount "$rootfs/proc" || umount -l "$rootfs/proc" || true; fi
  # --one-file-system: never descend into anything still mounted in the root file system.
  rm -rf --one-file-system "$work"
}
trap cleanup EXIT

in_root() { LC_ALL=C.UTF-8 DEBIAN_FRONTEND=noninteractive chroot "$rootfs" "$@"; }

build_base() {
  [ "$(id -u)" -eq 0 ] || die "building the base image $base needs root (debootstrap, chroot)"
  command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install debootstrap)"
  local started
  started=$(date +%s)
  log "debootstrap $suite from $mirror"
  debootstrap --variant=minbase --include=ca-certificates "$suite" "$rootfs" "$mirror" \
    >"$work/debootstrap.log" 2>&1 || { tail -n 40 "$work/debootstrap.log" >&2; die "debootstrap failed"; }
  log "debootstrap done in $(elapsed "$started")"

  cat >"$rootfs/etc/apt/sources.list" <<EOF
deb $mirror $suite main
deb $mirror $suite-updates main
deb $security_mirror $suite-security main
EOF
  cp /etc/resolv.conf "$rootfs/etc/resolv.conf"
  # As in Debian's official images: no service starts during package installation.
  printf '#!/bin/sh\nexit 101\n' >"$rootfs/usr/sbin/policy-rc.d"
  chmod 0755 "$rootfs/usr/sbin/policy-rc.d"
  # No cluster from the package: pgwarden runs initdb in its own data directory.
  mkdir -p "$rootfs/etc/postgresql-common/createcluster.d"
  echo 'create_main_cluster = false' >"$rootfs/etc/postgresql-common/createcluster.d/pgwarden.conf"
  # No documentation or manual pages, as in the slim images.
  cat >"$rootfs/etc/dpkg/dpkg.cfg.d/pgwarden-nodoc" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
  mount -t proc proc "$rootfs/proc"
  proc_mounted=1
  # The user first, with the uid/gid of the official postgres images (the Dockerfile checks it).
  in_root groupadd --system --gid 999 postgres
  in_root useradd --system --uid 999 --gid postgres --home-dir /var/lib/postgresql \
    --no-create-home --shell /bin/bash postgres
  started=$(date +%s)
  log "installing postgresql-$pg_major and security updates"
  {
    in_root apt-get update &&
      in_root apt-get -y upgrade &&
      in_root apt-get install -y --no-install-recommends "postgresql-$pg_major" &&
      in_root apt-get clean
  } >"$work/apt.log" 2>&1 || { tail -n 40 "$work/apt.log" >&2; die "installing packages failed"; }
  log "packages installed in $(elapsed "$started")"
  umount "$rootfs/proc"
  proc_mounted=0
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/log/*.log \
    "$rootfs"/var/log/apt/* "$rootfs"/tmp/* "$rootfs"/var/tmp/*
  : >"$rootfs/etc/resolv.conf"   # the container runtime provides its own
  [ -x "$rootfs/usr/lib/postgresql/$pg_major/bin/postgres" ] || die "postgres $pg_major is missing"

  started=$(date +%s)
  tar --numeric-owner --xattrs -C "$rootfs" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["bash"]' \
    --message "debootstrap $suite + postgresql-$pg_major (pgwarden docker/build-offline.sh)" \
    - "$base" >/dev/null
  log "imported $base in $(elapsed "$started")"
}

if [ "$rebuild_base" = 0 ] && docker image inspect "$base" >/dev/null 2>&1; then
  log "reusing the base image $base (--rebuild-base to build it again)"
else
  build_base
fi

context=$work/context
mkdir -p "$context"
if [ -z "$binary" ]; then
  started=$(date +%s)
  log "cargo build --release --no-default-features"
  (cd "$repo" && cargo build --release --locked --no-default-features)
  binary=${CARGO_TARGET_DIR:-$repo/target}/release/pgwarden
  log "built in $(elapsed "$started")"
fi
[ -x "$binary" ] || die "no pgwarden binary at $binary"
# Debug information is of no use in the image (a debug build is mostly that).
objcopy --strip-debug "$binary" "$context/pgwarden" 2>/dev/null || cp "$binary" "$context/pgwarden"
chmod 0755 "$context/pgwarden"

version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$repo/Cargo.toml" | head -n 1)
revision=$(git -C "$repo" rev-parse HEAD 2>/dev/null || echo unknown)

# docker build, tagging the result; the image the tag named before is removed (kept when a
# container still uses it).
build() {
  local tag=$1 old new
  shift
  old=$(docker image inspect --format '{{.Id}}' "$tag" 2>/dev/null || true)
  docker build -f "$repo/docker/Dockerfile" --build-arg "BASE_IMAGE=$base" -t "$tag" "$@" \
    "$context" >"$work/build.log" 2>&1 || { tail -n 40 "$work/build.log" >&2; die "docker build failed"; }
  new=$(docker image inspect --format '{{.Id}}' "$tag")
  if [ -n "$old" ] && [ "$old" != "$new" ]; then docker image rm "$old" >/dev/null 2>&1 || true; fi
  echo "$new"
}

started=$(date +%s)
log "docker build $image on $base"
# The runtime stage gets a tag of its own, so that its layers stay cached when images built on
# it are removed.
build "$base-runtime" --target runtime >/dev/null
id=$(build "$image" --target host --build-arg PGWARDEN_BINARY=pgwarden \
  --build-arg "VERSION=$version" --build-arg "REVISION=$revision")
log "built $image ($id) in $(elapsed "$started")"
echo "$image"
