#!/usr/bin/env bash
# Builds the tortie-node DaemonSet image as an OCI archive, without Docker:
#   $CARGO_TARGET_DIR/image/tortie-<version>.oci.tar   (tag tortie:<version>, or $TORTIE_IMAGE_TAG)
#
# The image holds one file, /usr/local/bin/tortie: a static (musl) binary that is the agent,
# the CNI plugin `install-cni` copies to the host, `tortie status` and the preStop hook. The
# probes are HTTP, so nothing else is needed: no shell, no libc, no package manager.
#
# Reproducible: the same sources give the same image digest. Paths are remapped out of the
# binary; image/oci-archive.sh writes the layer and the JSON documents byte for byte.
#
# The archive is what `ctr images import`, `skopeo copy oci-archive:…` and
# `podman load` take; README.md says how to push it to a registry.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"

log() { printf 'image: %s\n' "$*" >&2; }
die() { printf 'image: ERROR: %s\n' "$*" >&2; exit 1; }

version="$(sed -nE '/^\[workspace.package\]/,/^\[/ s/^version = "(.*)"/\1/p' Cargo.toml)"
[[ -n "$version" ]] || die "no [workspace.package] version in Cargo.toml"
tag="${TORTIE_IMAGE_TAG:-$version}"
repo="${TORTIE_IMAGE_REPO:-tortie}"
target_dir="${CARGO_TARGET_DIR:-$root/target}"
triple=x86_64-unknown-linux-musl
out_dir="$target_dir/image"
archive="$out_dir/$repo-$tag.oci.tar"

command -v musl-gcc >/dev/null || die "musl-gcc not found (apt-get install musl-tools)"
if command -v rustup >/dev/null && ! rustup target list --installed | grep -qx "$triple"; then
  log "adding the Rust target $triple"
  rustup target add "$triple" >/dev/null
fi

# Remapped paths: the binary must not depend on where the checkout or the cargo home lives.
cargo_home="${CARGO_HOME:-$HOME/.cargo}"
export RUSTFLAGS="--remap-path-prefix=$root=/tortie --remap-path-prefix=$cargo_home=/cargo ${TORTIE_IMAGE_RUSTFLAGS:-}"
log "building the static tortie binary ($triple, profile image)"
cargo build --locked --profile image --target "$triple" -p tortie
binary="$target_dir/$triple/image/tortie"
[[ -x "$binary" ]] || die "cargo did not produce $binary"
if ldd "$binary" >/dev/null 2>&1 && ! ldd "$binary" 2>&1 | grep -q 'statically linked\|not a dynamic'; then
  die "$binary is dynamically linked: $(ldd "$binary" | tr '\n' ' ')"
fi

rootfs="$(mktemp -d)"
trap 'rm -rf "$rootfs"' EXIT
install -D -m 0755 "$binary" "$rootfs/usr/local/bin/tortie"
install -d -m 1777 "$rootfs/tmp"
read -r digest compressed < <("$root/image/oci-archive.sh" "$rootfs" "$repo:$tag" "$archive" \
  '["/usr/local/bin/tortie"]' '["agent"]')

# calico/node v3.26.5 (linux/amd64) as published: the image tortie replaces on each node.
calico_node_bytes=$((88 * 1024 * 1024))
printf '%s\n' "$digest" >"$out_dir/$repo-$tag.digest"
log "wrote $archive"
echo "IMAGE ref=$repo:$tag digest=$digest compressed_bytes=$compressed binary_bytes=$(stat -c %s "$binary")"
awk -v t="$compressed" -v c="$calico_node_bytes" 'BEGIN {
  printf "BENCH image_compressed_size tortie=%.1fMiB ref(calico/node v3.26 amd64)=%.0fMiB ratio=%.3f\n", t/1048576, c/1048576, t/c }'
