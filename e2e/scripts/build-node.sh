#!/usr/bin/env bash
# Builds the rest of a cluster built from binaries, for the kubelet cluster tests
# (e2e/src/kubelet_cluster.rs), into ${TORTIE_CACHE:-$HOME/.cache/tortie}/bin/:
#   kubelet, kube-proxy, kube-controller-manager, kube-scheduler
# from k8s.io/kubernetes, the same release and wrapper module as build-kube.sh. containerd and
# runc come from Debian (deps.sh).
#
# Idempotent like build-kube.sh: a stamp records the versions; Go's caches are shared with it,
# so the Kubernetes packages the apiserver build compiled are not compiled again.
#
# Why Debian's containerd 1.6.20 and not containerd 2 built from its module: kubelet 1.36 still
# runs on a runtime without the CRI RuntimeConfig call (it logs "Falling back to using
# cgroupDriver from kubelet config" and takes cgroupfs from its own config); the refusal is
# planned for 1.38. Debian's package saves a containerd build in every cold CI run. Kubernetes'
# support table pairs 1.36 with containerd 2.2+, so the day this kubelet refuses 1.6, build
# github.com/containerd/containerd/v2 here (v2.2.9 and v2.3.7 build with CGO_ENABLED=0 and no
# replace directives).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

KUBE_VERSION="${TORTIE_KUBE_VERSION:-v1.36.2}"

CACHE="${TORTIE_CACHE:-$HOME/.cache/tortie}"
BIN="$CACHE/bin"
STAMP="$BIN/node.stamp"
WORK="$CACHE/kube-build"
KUBE_DIR="$WORK/kubernetes-$KUBE_VERSION"

log() { printf 'build-node: %s\n' "$*" >&2; }
die() { printf 'build-node: ERROR: %s\n' "$*" >&2; exit 1; }

command -v go >/dev/null 2>&1 || die "Go toolchain not found on PATH"
GO_VERSION="$(go env GOVERSION)"
KUBE_BINARIES=(kubelet kube-proxy kube-controller-manager kube-scheduler)
WANT_STAMP="kubernetes=$KUBE_VERSION go=$GO_VERSION"
all_present() {
  local b
  for b in "${KUBE_BINARIES[@]}"; do [[ -x "$BIN/$b" ]] || return 1; done
}
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT_STAMP" ]] && all_present; then
  log "up to date ($WANT_STAMP) in $BIN"
  exit 0
fi

# The apiserver's build made the wrapper module this one reuses.
"$here/build-kube.sh"
[[ -f "$KUBE_DIR/go.mod" ]] || die "no wrapper module at $KUBE_DIR (build-kube.sh should have made it)"

export GOPATH="$CACHE/go"
export GOMODCACHE="$CACHE/go/mod"
export GOCACHE="$CACHE/go/cache"
export GOFLAGS="-mod=mod -buildvcs=false"
export CGO_ENABLED=0
export GOTOOLCHAIN=local
NICE=(nice -n 10)
GO_PARALLEL="${TORTIE_GO_BUILD_P:-2}"
start_time=$(date +%s)
mkdir -p "$BIN"

git_major="${KUBE_VERSION#v}"; git_major="${git_major%%.*}"
git_minor="${KUBE_VERSION#v*.}"; git_minor="${git_minor%%.*}"
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X $pkg.gitVersion=$KUBE_VERSION -X $pkg.gitMajor=$git_major -X $pkg.gitMinor=$git_minor"
  ldflags+=" -X $pkg.gitTreeState=clean"
done
log "building ${KUBE_BINARIES[*]} $KUBE_VERSION with $GO_VERSION; this takes minutes"
(
  cd "$KUBE_DIR"
  pkgs=()
  for b in "${KUBE_BINARIES[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$b"); done
  "${NICE[@]}" go build -p "$GO_PARALLEL" -trimpath -ldflags "$ldflags" -o "$KUBE_DIR/out/" "${pkgs[@]}"
) || die "go build of the node binaries of k8s.io/kubernetes@$KUBE_VERSION failed (see above)"

for b in "${KUBE_BINARIES[@]}"; do install -m 0755 "$KUBE_DIR/out/$b" "$BIN/$b"; done
"$BIN/kubelet" --version >&2 || die "built kubelet does not run"
printf '%s\n' "$WANT_STAMP" >"$STAMP"
log "done in $(($(date +%s) - start_time))s: $WANT_STAMP -> $BIN"
