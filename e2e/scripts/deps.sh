#!/usr/bin/env bash
# Installs what tortie's tests and demo need, idempotently: Debian packages (BGP daemons,
# iproute2, CNI plugins, QEMU for the IPIP guest, containerd and runc for the kubelet cluster)
# and the Go-built Kubernetes binaries.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

packages=(
  iproute2 iputils-ping procps psmisc openssl nftables kmod
  bird2 frr gobgpd exabgp
  nginx libnginx-mod-stream
  containernetworking-plugins
  qemu-system-x86 busybox-static cpio
  musl-tools containerd runc skopeo util-linux
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "deps: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null || echo "deps: apt-get update failed; trying with the current lists" >&2
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
else
  echo "deps: Debian packages present" >&2
fi

# The packages' own services must not run in the root namespace: tests start their own.
for svc in bird frr nginx; do
  pkill -x "$svc" 2>/dev/null || true
done

# kube-apiserver, etcd, kubectl, then kubelet, kube-proxy, controller-manager, scheduler.
"$here/build-node.sh"

# The DaemonSet image's static binary (`make image`).
if command -v rustup >/dev/null && ! rustup target list --installed | grep -qx x86_64-unknown-linux-musl; then
  rustup target add x86_64-unknown-linux-musl >/dev/null
fi

# Debian's stock kernel for the IPIP guest (`make test-kernel`), downloaded and unpacked once.
"$here/../qemu/prepare.sh"

# Nightly Rust only for the BGP decoder's libFuzzer run (`make fuzz`); tortie itself is stable.
if command -v rustup >/dev/null && ! rustup toolchain list | grep -q '^nightly'; then
  rustup toolchain install nightly --profile minimal >/dev/null 2>&1 \
    || echo "deps: could not install nightly Rust; \`make fuzz\` will fail" >&2
fi
