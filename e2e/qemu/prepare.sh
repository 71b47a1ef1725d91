#!/usr/bin/env bash
# Fetches Debian's stock 6.1 kernel for the QEMU guest and unpacks it under the cache, once.
# The host kernel has no ipip module; this kernel has it as a loadable .ko. Nothing is installed
# into /boot: the .deb is only downloaded (`apt-get download`) and unpacked (`dpkg -x`).
#
# Result: $TORTIE_CACHE/qemu/kernel/{vmlinuz,lib/modules/<kver>/...,kver}. Idempotent: a present,
# complete tree is reused without asking apt anything. TORTIE_QEMU_REFRESH=1 re-picks the newest.
set -euo pipefail

cache="${TORTIE_CACHE:-$HOME/.cache/tortie}/qemu"
kernel_dir="$cache/kernel"
ready="$kernel_dir/.ready"

if [[ -f "$ready" && -f "$kernel_dir/vmlinuz" && "${TORTIE_QEMU_REFRESH:-0}" != 1 ]]; then
  echo "qemu prepare: kernel $(cat "$kernel_dir/kver") present in $kernel_dir" >&2
  exit 0
fi

for tool in apt-get apt-cache dpkg depmod; do
  command -v "$tool" >/dev/null || { echo "qemu prepare: $tool missing (run make deps)" >&2; exit 1; }
done

# The newest stock (not cloud, not rt) 6.1 image that apt can actually fetch. Names without a
# candidate version are stale entries of the package lists.
pick_package() {
  local name
  apt-cache pkgnames linux-image-6.1.0- \
    | grep -E '^linux-image-6\.1\.0-[0-9]+-amd64(-unsigned)?$' \
    | sort -V -r \
    | while read -r name; do
        # Read the whole output: `grep -q` would close the pipe early and, with pipefail, fail.
        if [[ "$(apt-cache policy "$name")" =~ Candidate:\ [0-9] ]]; then
          echo "$name"
          return 0
        fi
      done
}
package="$(pick_package | head -n1)"
if [[ -z "$package" ]]; then
  echo "qemu prepare: no linux-image-6.1.0-*-amd64 package known to apt (apt-get update?)" >&2
  exit 1
fi

debs="$cache/debs"
mkdir -p "$debs"
deb="$(ls "$debs/${package}_"*.deb 2>/dev/null | sort -V | tail -n1 || true)"
if [[ -z "$deb" ]]; then
  echo "qemu prepare: downloading $package" >&2
  (cd "$debs" && apt-get download -q "$package" >&2)
  deb="$(ls "$debs/${package}_"*.deb | sort -V | tail -n1)"
  # Older kernels' packages are of no further use.
  find "$debs" -maxdepth 1 -name 'linux-image-*.deb' ! -path "$deb" -delete
fi

# Unpack into a fresh directory and swap it in, so an interrupted run never leaves a half tree.
staging="$cache/kernel.tmp.$$"
rm -rf "$staging"
trap 'rm -rf "$staging"' EXIT
dpkg -x "$deb" "$staging"

kver="$(ls "$staging/lib/modules" | head -n1)"
vmlinuz="$staging/boot/vmlinuz-$kver"
if [[ -z "$kver" || ! -f "$vmlinuz" ]]; then
  echo "qemu prepare: $deb has no /boot/vmlinuz-<kver> with matching /lib/modules" >&2
  exit 1
fi
# The package ships no modules.dep (the postinst normally makes it).
depmod -b "$staging" "$kver"
cp "$vmlinuz" "$staging/vmlinuz"
echo "$kver" >"$staging/kver"
echo "$package $(dpkg-deb -f "$deb" Version)" >"$staging/.ready"

rm -rf "$kernel_dir"
mv "$staging" "$kernel_dir"
trap - EXIT
echo "qemu prepare: kernel $kver ($package) ready in $kernel_dir" >&2
