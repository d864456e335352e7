#!/usr/bin/env bash
# Build the node's images locally (no registry is reachable in the test environment) and save each
# as an archive for `ctr images import`:
#
#   base        Debian bookworm with Python, made by mmdebstrap: the stand-in for python:3.12-slim
#   pause       the Pod sandbox image (containerd's sandbox_image), a static Go binary (pause/)
#   app         tests/node/app.py, the application whose Pods the controller restarts
#   controller  the Containerfile at the checkout's root, built with `--build-arg BASE=<base>`
#
# Everything is cached outside the checkout in $RELOADER_TESTENV_CACHE/images (the rootfs tarball
# and the archives) and in buildah's storage; each image's tag is a hash of what it is built from,
# so a warm run only hashes files. Prints one line per image: `<role> <reference> <archive>`.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
CACHE="${RELOADER_TESTENV_CACHE:-$HOME/.cache/reloader-testenv}/images"
SUITE="${RELOADER_NODE_SUITE:-bookworm}"
mkdir -p "$CACHE"

log() { echo "node-images: $*" >&2; }

# A short hash of files' names and contents, for image tags.
digest() { (cd "$ROOT" && for f in "$@"; do echo "$f"; cat "$f"; done) | sha256sum | cut -c1-12; }

have_image() { buildah images --quiet "$1" >/dev/null 2>&1; }

# `buildah push` to a docker-archive once per tag; the archive's name carries the tag.
save() {
  local role="$1" ref="$2" archive="$CACHE/$3.tar"
  if [ ! -s "$archive" ]; then
    buildah push --quiet "$ref" "docker-archive:$archive.part:$ref" >/dev/null
    mv "$archive.part" "$archive"
  fi
  echo "$role $ref $archive"
}

# No --layers: no intermediate images pile up (reloader/ changes with nearly every build anyway).
# No --layers: no intermediate images pile up (reloader/ changes with nearly every build anyway).
# The host's CA bundle is mounted into every RUN step: pip reaches PyPI through whatever TLS the
# host trusts (an egress proxy with its own CA, say) without that CA ending up in an image.
bud() {
  buildah bud --quiet --network host \
    --volume /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro "$@" >/dev/null
}

base_image() {
  local rootfs="$CACHE/debian-$SUITE-python.tar"
  local ref="localhost/reloader-test/python-base:$SUITE"
  if [ ! -s "$rootfs" ]; then
    log "making a Debian $SUITE root filesystem with Python (mmdebstrap, about a minute)"
    # The marker that makes pip refuse system-wide installs goes: in this image, as in
    # python:3.12-slim, the Python is the image's own and pip installs into it.
    mmdebstrap --quiet --variant=minbase --include=python3,python3-pip,ca-certificates \
      --customize-hook='rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED' \
      --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
      "$SUITE" "$rootfs.part"
    mv "$rootfs.part" "$rootfs"
    buildah rmi "$ref" >/dev/null 2>&1 || true
  fi
  if ! have_image "$ref"; then
    local c
    c="$(buildah from scratch)"
    buildah add --quiet "$c" "$rootfs" / >/dev/null
    buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
      --env LANG=C.UTF-8 --cmd '["python3"]' "$c"
    buildah commit --quiet "$c" "$ref" >/dev/null
    buildah rm "$c" >/dev/null
  fi
  echo "$ref"
}

pause_image() {
  local tag ref
  tag="$(digest tests/node/pause/main.go tests/node/pause/go.mod)"
  ref="localhost/reloader-test/pause:$tag"
  if ! have_image "$ref"; then
    log "building the pause image"
    local out c
    out="$(mktemp -d)"
    (cd "$HERE/pause" && CGO_ENABLED=0 GOTOOLCHAIN=local go build -trimpath -ldflags '-s -w' -o "$out/pause" .)
    c="$(buildah from scratch)"
    buildah copy --quiet "$c" "$out/pause" /pause >/dev/null
    buildah config --entrypoint '["/pause"]' --user 65535:65535 "$c"
    buildah commit --quiet "$c" "$ref" >/dev/null
    buildah rm "$c" >/dev/null
    rm -rf "$out"
  fi
  save pause "$ref" "pause-$tag"
}

app_image() {
  local base="$1" tag ref
  tag="$(digest tests/node/app.py tests/node/app.Containerfile)-$SUITE"
  ref="localhost/reloader-test/app:$tag"
  if ! have_image "$ref"; then
    log "building the application image"
    bud --build-arg "BASE=$base" -t "$ref" -f "$HERE/app.Containerfile" "$HERE"
  fi
  save app "$ref" "app-$tag"
}

controller_image() {
  local base="$1" tag ref
  # What the Containerfile copies, and the Containerfile and its ignore file themselves.
  tag="$(cd "$ROOT" && digest Containerfile .containerignore pyproject.toml README.md \
    $(find reloader -name '*.py' -o -name 'py.typed' | LC_ALL=C sort))-$SUITE"
  ref="localhost/reloader:$tag"
  if ! have_image "$ref"; then
    log "building the controller image from the Containerfile (pip needs PyPI)"
    bud --build-arg "BASE=$base" -t "$ref" -f "$ROOT/Containerfile" "$ROOT"
  fi
  save controller "$ref" "reloader-$tag"
  # Each change to reloader/ makes a new image: keep only the current one (archives and buildah).
  find "$CACHE" -maxdepth 1 -name "reloader-*-$SUITE.tar" ! -name "reloader-$tag.tar" -delete
  buildah images --format '{{.Name}}:{{.Tag}}' | grep '^localhost/reloader:' \
    | grep -vx "$ref" | xargs -r buildah rmi >/dev/null 2>&1 || true
}

for tool in buildah mmdebstrap go sha256sum; do
  command -v "$tool" >/dev/null || { log "$tool is missing: run tests/node/setup.sh as root"; exit 1; }
done
BASE="$(base_image)"
pause_image
app_image "$BASE"
controller_image "$BASE"
