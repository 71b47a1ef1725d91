#!/usr/bin/env bash
# Builds the real Kubernetes control-plane binaries the test bed runs:
#   kube-apiserver, kubectl  (Go module k8s.io/kubernetes at $KUBE_VERSION)
#   etcd                     (Go module go.etcd.io/etcd/server/v3 at $ETCD_VERSION)
# into ${TORTIE_CACHE:-$HOME/.cache/tortie}/bin/.
#
# Idempotent: a stamp file records the pinned versions and the Go version; when it
# matches and all binaries exist, nothing is built. Go's module and build caches live
# under the same cache dir so CI can keep them between runs.
#
# Why a wrapper module: k8s.io/kubernetes points every k8s.io/* staging module at
# ./staging/... through replace directives, which Go ignores for dependencies, so a
# plain `go install k8s.io/kubernetes/cmd/...@vX` cannot resolve them. The wrapper
# re-pins each staging module to its published v0.X.Y twin.
#
# Why these versions: v1.36.2 built with Go 1.26 serves a correct OpenAPI document
# (a build of the same tree with Go 1.27 did not). etcd must be >= 3.5.13 for the
# apiserver's streaming lists; 3.6.8 is the etcd release k8s v1.36.2 itself pins.
set -euo pipefail

KUBE_VERSION="${TORTIE_KUBE_VERSION:-v1.36.2}"
ETCD_VERSION="${TORTIE_ETCD_VERSION:-v3.6.8}"
# The Go minor release this Kubernetes release is known to work with.
REQUIRED_GO_MINOR="go1.26"

CACHE="${TORTIE_CACHE:-$HOME/.cache/tortie}"
BIN="$CACHE/bin"
STAMP="$BIN/kube.stamp"
WORK="$CACHE/kube-build"

log() { printf 'build-kube: %s\n' "$*" >&2; }
die() { printf 'build-kube: ERROR: %s\n' "$*" >&2; exit 1; }

command -v go >/dev/null 2>&1 || die "Go toolchain not found on PATH (install golang ${REQUIRED_GO_MINOR}.x)"
GO_VERSION="$(go env GOVERSION)"
case "$GO_VERSION" in
  "$REQUIRED_GO_MINOR" | "$REQUIRED_GO_MINOR".*) ;;
  *)
    if [[ "${TORTIE_ALLOW_ANY_GO:-}" != "1" ]]; then
      die "Go is $GO_VERSION but Kubernetes $KUBE_VERSION is pinned for ${REQUIRED_GO_MINOR}.x (other Go releases have produced a broken OpenAPI document). Set TORTIE_ALLOW_ANY_GO=1 to try anyway."
    fi
    log "WARNING: building with $GO_VERSION, not ${REQUIRED_GO_MINOR}.x (TORTIE_ALLOW_ANY_GO=1)"
    ;;
esac

WANT_STAMP="kubernetes=$KUBE_VERSION etcd=$ETCD_VERSION go=$GO_VERSION"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT_STAMP" &&
      -x "$BIN/kube-apiserver" && -x "$BIN/kubectl" && -x "$BIN/etcd" ]]; then
  log "up to date ($WANT_STAMP) in $BIN"
  exit 0
fi

mkdir -p "$BIN" "$WORK"
export GOPATH="$CACHE/go"
export GOMODCACHE="$CACHE/go/mod"
export GOCACHE="$CACHE/go/cache"
export GOFLAGS="-mod=mod -buildvcs=false"
export CGO_ENABLED=0
# Never let Go fetch a different toolchain: the pin above is about the local one.
export GOTOOLCHAIN=local
# Builds share two cores with other work: stay polite.
NICE=(nice -n 10)
GO_PARALLEL="${TORTIE_GO_BUILD_P:-2}"

start_time=$(date +%s)

# ---------------------------------------------------------------- kubernetes
KUBE_MINOR_TAG="v0.${KUBE_VERSION#v1.}" # v1.36.2 -> v0.36.2
KUBE_DIR="$WORK/kubernetes-$KUBE_VERSION"
mkdir -p "$KUBE_DIR"
log "resolving k8s.io/kubernetes@$KUBE_VERSION"
download_json="$(go mod download -json "k8s.io/kubernetes@$KUBE_VERSION")" ||
  die "go mod download k8s.io/kubernetes@$KUBE_VERSION failed (GOPROXY=$(go env GOPROXY)): ${download_json:-see above}"
upstream_gomod="$(sed -nE 's/^[[:space:]]*"GoMod": "(.*)",?$/\1/p' <<<"$download_json")"
[[ -f "$upstream_gomod" ]] || die "could not download go.mod of k8s.io/kubernetes@$KUBE_VERSION (is the Go module proxy reachable? GOPROXY=$(go env GOPROXY))"
staging_modules="$(sed -nE 's#^[[:space:]]*(k8s\.io/[A-Za-z0-9._-]+) => \./staging/.*#\1#p' "$upstream_gomod")"
[[ -n "$staging_modules" ]] || die "found no staging replace directives in $upstream_gomod"

{
  printf 'module tortie.local/kubebuild\n\ngo 1.26\n\nrequire k8s.io/kubernetes %s\n\nreplace (\n' "$KUBE_VERSION"
  for m in $staging_modules; do printf '\t%s => %s %s\n' "$m" "$m" "$KUBE_MINOR_TAG"; done
  printf ')\n'
} >"$KUBE_DIR/go.mod.new"
# Keep go.sum across runs; only reset it when the pins changed.
if ! cmp -s "$KUBE_DIR/go.mod.new" "$KUBE_DIR/go.mod.pinned" 2>/dev/null; then
  cp "$KUBE_DIR/go.mod.new" "$KUBE_DIR/go.mod"
  cp "$KUBE_DIR/go.mod.new" "$KUBE_DIR/go.mod.pinned"
  rm -f "$KUBE_DIR/go.sum"
fi
rm -f "$KUBE_DIR/go.mod.new"
cat >"$KUBE_DIR/tools.go" <<'EOF'
//go:build tools

// Package tools keeps the command packages in the module graph.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
EOF

# Version stamps so `kubectl version` and /version report the real release.
git_major="${KUBE_VERSION#v}"; git_major="${git_major%%.*}"
git_minor="${KUBE_VERSION#v*.}"; git_minor="${git_minor%%.*}"
build_date="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X $pkg.gitVersion=$KUBE_VERSION -X $pkg.gitMajor=$git_major -X $pkg.gitMinor=$git_minor"
  ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$build_date"
done

log "building kube-apiserver + kubectl $KUBE_VERSION with $GO_VERSION (CGO_ENABLED=0, -p $GO_PARALLEL); this takes minutes"
(
  cd "$KUBE_DIR"
  go mod download k8s.io/kubernetes
  "${NICE[@]}" go build -p "$GO_PARALLEL" -trimpath -ldflags "$ldflags" -o "$KUBE_DIR/out/" \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kubectl
) || die "go build of k8s.io/kubernetes@$KUBE_VERSION failed (see output above)"

# -------------------------------------------------------------------- etcd
ETCD_DIR="$WORK/etcd-$ETCD_VERSION"
mkdir -p "$ETCD_DIR/cmd/etcd"
cat >"$ETCD_DIR/go.mod.new" <<EOF
module tortie.local/etcdbuild

go 1.26

require go.etcd.io/etcd/server/v3 $ETCD_VERSION
EOF
if ! cmp -s "$ETCD_DIR/go.mod.new" "$ETCD_DIR/go.mod.pinned" 2>/dev/null; then
  cp "$ETCD_DIR/go.mod.new" "$ETCD_DIR/go.mod"
  cp "$ETCD_DIR/go.mod.new" "$ETCD_DIR/go.mod.pinned"
  rm -f "$ETCD_DIR/go.sum"
fi
rm -f "$ETCD_DIR/go.mod.new"
# etcd's own main package lives in its root module, whose go.mod uses local replace
# directives; this three-line main calls the same entry point from the server module.
cat >"$ETCD_DIR/cmd/etcd/main.go" <<'EOF'
// Command etcd runs the etcd server from go.etcd.io/etcd/server/v3.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
EOF

log "building etcd $ETCD_VERSION"
(
  cd "$ETCD_DIR"
  "${NICE[@]}" go build -p "$GO_PARALLEL" -trimpath -ldflags "-s -w" -o "$ETCD_DIR/out/etcd" ./cmd/etcd
) || die "go build of go.etcd.io/etcd/server/v3@$ETCD_VERSION failed (see output above)"

# ------------------------------------------------------------------ install
install -m 0755 "$KUBE_DIR/out/kube-apiserver" "$BIN/kube-apiserver"
install -m 0755 "$KUBE_DIR/out/kubectl" "$BIN/kubectl"
install -m 0755 "$ETCD_DIR/out/etcd" "$BIN/etcd"

"$BIN/etcd" --version >&2 || die "built etcd does not run"
"$BIN/kubectl" version --client >&2 || die "built kubectl does not run"
"$BIN/kube-apiserver" --version >&2 || die "built kube-apiserver does not run"

printf '%s\n' "$WANT_STAMP" >"$STAMP"
log "done in $(($(date +%s) - start_time))s: $WANT_STAMP -> $BIN"
