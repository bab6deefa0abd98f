#!/usr/bin/env bash
# Build the `helm` binary of one pinned Helm v3 release with `go install` from its published Go
# module (docs/operator.md, "Installing with Helm"); the chart tests use it. Never downloads
# prebuilt binaries. helm.sh/helm/v3 has no replace directives, so `go install pkg@version` works.
#
#   scripts/build-helm.sh                 build (exits at once when the binary already exists)
#   scripts/build-helm.sh --print-bin-dir print the directory the binary lives in, build nothing
#
# Output: ${CHAOS_HELM_CACHE:-$HOME/.cache/chaos-train/helm}/v<version>/bin/helm, published
# atomically. Environment: CHAOS_HELM_BUILD_JOBS (go build -p, default 1); the build runs under
# `nice`. GOMODCACHE/GOCACHE are Go's own (outside the repository).
set -euo pipefail

HELM_VERSION=3.18.6 # pinned release; built against Kubernetes 1.33 client modules
K8S_MINOR=33        # what helm's own Makefile stamps from its k8s.io/client-go (v0.33.x)

CACHE_ROOT="${CHAOS_HELM_CACHE:-$HOME/.cache/chaos-train/helm}"
OUT="$CACHE_ROOT/v$HELM_VERSION"
BIN="$OUT/bin"

source "$(dirname "$0")/build-lib.sh"
build_args build-helm "$BIN" "$@"
[[ -x "$BIN/helm" ]] && exit 0

command -v go >/dev/null || die "Go is required (Helm $HELM_VERSION needs Go >= 1.24)"

# One build at a time: a second caller waits here, then finds the binary and exits.
build_lock "$OUT" "helm v$HELM_VERSION"
[[ -x "$BIN/helm" ]] && exit 0

start=$(date +%s)
jobs="${CHAOS_HELM_BUILD_JOBS:-1}"
export CGO_ENABLED=0 GOFLAGS="-buildvcs=false" GOTOOLCHAIN="${GOTOOLCHAIN:-local}"

# The version stamps helm's Makefile sets for a tagged release (the Kubernetes version is what
# `helm template` reports as .Capabilities.KubeVersion without a cluster).
v=helm.sh/helm/v3/internal/version
stamp="-X $v.version=v$HELM_VERSION -X $v.metadata= -X $v.gitTreeState=clean"
for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
  stamp+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$K8S_MINOR"
done

rm -rf "$OUT/bin.partial"
mkdir -p "$OUT/bin.partial"
log "go install -p $jobs helm.sh/helm/v3/cmd/helm@v$HELM_VERSION with $(go version | cut -d' ' -f3)" \
  "(a few minutes on 2 cores with cold Go caches)"
GOBIN="$OUT/bin.partial" nice -n 10 go install -p "$jobs" -trimpath -ldflags "-s -w $stamp" \
  "helm.sh/helm/v3/cmd/helm@v$HELM_VERSION" \
  || die "go install failed (is the Go module proxy reachable?)"

"$OUT/bin.partial/helm" version >&2
rm -rf "$BIN"
mv "$OUT/bin.partial" "$BIN"
log "done in $(($(date +%s) - start)) s: $BIN"
