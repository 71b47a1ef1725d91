#!/usr/bin/env bash
# Writes a one-layer OCI image archive from a directory, byte for byte reproducibly:
#
#   image/oci-archive.sh ROOTFS REPO:TAG OUT.tar ENTRYPOINT_JSON [CMD_JSON]
#   e.g. image/oci-archive.sh rootfs/ tortie:0.1.0 out.tar '["/usr/local/bin/tortie"]' '["agent"]'
#
# Every tar entry gets owner 0, mtime $SOURCE_DATE_EPOCH (default 0) and sorted names; gzip
# stores no name or time; the JSON documents are written exactly as below. The same directory
# contents therefore give the same manifest digest, printed on stdout as
#   <manifest digest> <compressed layer bytes>
#
# The index names the image twice: containerd's importer (`ctr images import`) reads
# io.containerd.image.name, skopeo and podman match org.opencontainers.image.ref.name.
set -euo pipefail

die() { printf 'oci-archive: ERROR: %s\n' "$*" >&2; exit 1; }

(($# >= 4)) || die "usage: $0 ROOTFS REPO:TAG OUT.tar ENTRYPOINT_JSON [CMD_JSON]"
rootfs="$1" ref="$2" out="$3" entrypoint="$4" cmd="${5:-[]}"
[[ -d "$rootfs" ]] || die "$rootfs is not a directory"
repo="${ref%:*}" tag="${ref##*:}"
[[ "$repo" != "$ref" && -n "$tag" ]] || die "image reference $ref has no tag"
case "$repo" in
  */*) full_name="$repo" ;;
  *) full_name="docker.io/library/$repo" ;;
esac
epoch="${SOURCE_DATE_EPOCH:-0}"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

tar_flags=(--sort=name --format=posix --numeric-owner --owner=0 --group=0 --mtime="@$epoch"
  --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime)

# A copy, so the caller's directory keeps its own times.
cp -a "$rootfs" "$work/rootfs"
find "$work/rootfs" -exec touch -h -d "@$epoch" {} +
(cd "$work/rootfs" && find . -mindepth 1 -maxdepth 1 -printf '%P\n' | LC_ALL=C sort) >"$work/top"
tar "${tar_flags[@]}" -C "$work/rootfs" -cf "$work/layer.tar" -T "$work/top"
diff_id="$(sha256sum "$work/layer.tar" | cut -d' ' -f1)"
blobs="$work/oci/blobs/sha256"
mkdir -p "$blobs"
gzip -n -9 -c "$work/layer.tar" >"$work/layer.tar.gz"
layer_digest="$(sha256sum "$work/layer.tar.gz" | cut -d' ' -f1)"
layer_size="$(stat -c %s "$work/layer.tar.gz")"
mv "$work/layer.tar.gz" "$blobs/$layer_digest"

# Stores a JSON document as a blob; prints "<digest> <size>".
put_blob() {
  local file="$work/blob.json" digest
  printf '%s' "$1" >"$file"
  digest="$(sha256sum "$file" | cut -d' ' -f1)"
  mv "$file" "$blobs/$digest"
  printf '%s %s\n' "$digest" "$(stat -c %s "$blobs/$digest")"
}

created="$(date -u -d "@$epoch" +%Y-%m-%dT%H:%M:%SZ)"
config="{\"architecture\":\"amd64\",\"os\":\"linux\",\"created\":\"$created\",\
\"config\":{\"Entrypoint\":$entrypoint,\"Cmd\":$cmd,\
\"Env\":[\"PATH=/usr/local/bin:/usr/bin:/bin:/sbin\"],\"WorkingDir\":\"/\",\
\"Labels\":{\"org.opencontainers.image.title\":\"$repo\",\"org.opencontainers.image.version\":\"$tag\"}},\
\"rootfs\":{\"type\":\"layers\",\"diff_ids\":[\"sha256:$diff_id\"]},\
\"history\":[{\"created\":\"$created\",\"created_by\":\"tortie image/oci-archive.sh\"}]}"
read -r config_digest config_size < <(put_blob "$config")

manifest="{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\
\"config\":{\"mediaType\":\"application/vnd.oci.image.config.v1+json\",\"digest\":\"sha256:$config_digest\",\"size\":$config_size},\
\"layers\":[{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar+gzip\",\"digest\":\"sha256:$layer_digest\",\"size\":$layer_size}]}"
read -r manifest_digest manifest_size < <(put_blob "$manifest")

printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"annotations":{"io.containerd.image.name":"%s:%s","org.opencontainers.image.ref.name":"%s"}}]}' \
  "$manifest_digest" "$manifest_size" "$full_name" "$tag" "$tag" >"$work/oci/index.json"
printf '{"imageLayoutVersion":"1.0.0"}' >"$work/oci/oci-layout"
find "$work/oci" -exec touch -h -d "@$epoch" {} +
mkdir -p "$(dirname "$out")"
tar "${tar_flags[@]}" -C "$work/oci" -cf "$out.tmp" oci-layout index.json blobs
mv "$out.tmp" "$out"
printf 'sha256:%s %s\n' "$manifest_digest" "$layer_size"
