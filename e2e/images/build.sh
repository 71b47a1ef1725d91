#!/usr/bin/env bash
# The test cluster's images, as OCI archives under $CARGO_TARGET_DIR/image/ (no registry here):
#   tortie.local/pause:1    the pod sandbox: a static pause binary (pause.c, musl-gcc)
#   tortie.local/busybox:1  workloads: Debian's busybox-static (sh, ping, wget, nc, httpd, nslookup)
# and tortie:<version> itself through image/build.sh. Each is rebuilt only when its inputs change.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out="${CARGO_TARGET_DIR:-$root/target}/image"
mkdir -p "$out"
log() { printf 'e2e-images: %s\n' "$*" >&2; }

# Builds $2 (an archive) from the rootfs that function $3 fills, unless its stamp matches $1.
build_if_changed() {
  local stamp_value="$1" archive="$2" fill="$3" ref="$4" entrypoint="$5" cmd="${6:-[]}"
  if [[ -f "$archive" && "$(cat "$archive.stamp" 2>/dev/null)" == "$stamp_value" ]]; then
    log "$ref up to date"
    return
  fi
  local rootfs
  rootfs="$(mktemp -d)"
  "$fill" "$rootfs"
  read -r digest size < <("$root/image/oci-archive.sh" "$rootfs" "$ref" "$archive" "$entrypoint" "$cmd")
  rm -rf "$rootfs"
  printf '%s\n' "$stamp_value" >"$archive.stamp"
  log "$ref $digest ($size bytes compressed)"
}

fill_pause() {
  musl-gcc -static -Os -s -o "$1/pause" "$here/pause.c"
}
fill_busybox() {
  install -D -m 0755 /bin/busybox "$1/bin/busybox"
  local applet
  for applet in $(/bin/busybox --list); do
    [[ "$applet" == busybox ]] || ln -s busybox "$1/bin/$applet"
  done
  mkdir -p "$1/etc" "$1/tmp" "$1/www" "$1/usr/bin" "$1/sbin"
  chmod 1777 "$1/tmp"
  printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' >"$1/etc/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\n' >"$1/etc/group"
}

command -v musl-gcc >/dev/null || { log "musl-gcc not found (apt-get install musl-tools)"; exit 1; }
[[ -x /bin/busybox ]] || { log "/bin/busybox not found (apt-get install busybox-static)"; exit 1; }
build_if_changed "$(sha256sum "$here/pause.c" "$root/image/oci-archive.sh" | sha256sum)" \
  "$out/pause-1.oci.tar" fill_pause tortie.local/pause:1 '["/pause"]'
build_if_changed "$(sha256sum /bin/busybox "$root/image/oci-archive.sh" | sha256sum)" \
  "$out/busybox-1.oci.tar" fill_busybox tortie.local/busybox:1 '[]' '["sh"]'
"$root/image/build.sh"
