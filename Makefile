# tortie — see README.md. Every target is safe to run again.
SHELL := /bin/bash
export TORTIE_CACHE ?= $(HOME)/.cache/tortie
export CARGO_TARGET_DIR ?= $(TORTIE_CACHE)/target
CARGO ?= cargo

.PHONY: all build demo test e2e e2e-cluster e2e-images image bench lint deps clean-netns test-kernel fuzz

all: build

build:
	$(CARGO) build --workspace

## Brings up a 3-node tortie cluster in network namespaces against a real kube-apiserver.
demo: deps
	@if [ -x e2e/scripts/demo.sh ]; then e2e/scripts/demo.sh; else echo "make demo: not yet (see README status)"; fi

## The test command CI runs: lint; every unit, kernel, BGP-interop, apiserver and e2e test;
## then the IPIP tests inside a QEMU guest (this host kernel has no ipip module).
test: lint e2e-images
	$(CARGO) build -p tortie
	TORTIE_REQUIRE_KUBE=1 $(CARGO) test --workspace --no-fail-fast; s=$$?; $(MAKE) clean-netns; exit $$s
	$(MAKE) test-kernel
	$(MAKE) fuzz FUZZ_SECONDS=30

## The BGP decoder under libFuzzer for a bounded time (nightly toolchain, installed by deps).
FUZZ_SECONDS ?= 60
fuzz:
	bgp/fuzz/run.sh $(FUZZ_SECONDS)

## Multi-node end-to-end scenarios only (the e2e crate's tests).
e2e:
	$(CARGO) build -p tortie
	TORTIE_REQUIRE_KUBE=1 $(CARGO) test -p tortie-e2e --no-fail-fast; s=$$?; $(MAKE) clean-netns; exit $$s

## tortie installed with `kubectl apply -f manifests/` on a cluster of real kubelets + containerd
## (e2e/src/kubelet_cluster.rs); part of `make test` too.
e2e-cluster: e2e-images
	TORTIE_REQUIRE_KUBE=1 $(CARGO) test -p tortie-e2e --test cluster_install -- --nocapture; s=$$?; $(MAKE) clean-netns; exit $$s

## The DaemonSet image: $(CARGO_TARGET_DIR)/image/tortie-<version>.oci.tar (static musl binary,
## reproducible; `ctr images import` / `skopeo copy oci-archive:…` take it).
image:
	image/build.sh

## The test cluster's images (pause, busybox) and tortie's, as OCI archives.
e2e-images:
	e2e/images/build.sh

## Benchmarks: each prints `BENCH name=… tortie=… ref=…` lines.
bench:
	$(CARGO) build --release -p tortie
	TORTIE_BIN=$(CARGO_TARGET_DIR)/release/tortie $(CARGO) bench --workspace 2>&1 | tee $(TORTIE_CACHE)/bench.log | grep -E '^BENCH' || true
	@echo "full output: $(TORTIE_CACHE)/bench.log"

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## System packages and the Go-built kube-apiserver/etcd/kubectl (cached under $(TORTIE_CACHE)).
deps:
	e2e/scripts/deps.sh

## Removes leftover test namespaces (only tortie-<pid>-… ones whose test process is gone, or
## every tortie-* one with FORCE=1), killing what runs in them.
clean-netns:
	@for ns in $$(ip netns list | awk '$$1 ~ /^tortie-/ {print $$1}'); do \
		pid=$$(echo $$ns | cut -d- -f2); \
		if [ -z "$(FORCE)" ] && [ -d /proc/$$pid ]; then continue; fi; \
		for p in $$(ip netns pids $$ns); do kill -9 $$p 2>/dev/null || true; done; \
		ip netns del $$ns && echo "removed netns $$ns"; \
	done; true

## IPIP kernel tests inside a QEMU guest on Debian's stock kernel (this host has no ipip module).
test-kernel:
	e2e/qemu/test-kernel.sh
