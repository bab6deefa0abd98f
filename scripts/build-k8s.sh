#!/usr/bin/env bash
# Build kube-apiserver, kube-controller-manager and kubectl of one pinned Kubernetes release with
# `go build` from the published Go modules (docs/operator.md, "Control-plane tests").
#
# No registry ships kube-apiserver, and `go install k8s.io/kubernetes/cmd/...@v1.x` fails because
# k8s.io/kubernetes replaces its staging modules (k8s.io/api, ...) with ./staging paths. So a small
# wrapper module requires k8s.io/kubernetes at the pinned version and replaces each staging module
# with its published v0.<minor>.<patch> tag; the list is read from the release's own go.mod.
# Never downloads prebuilt binaries.
#
#   scripts/build-k8s.sh                 build (exits at once when the binaries already exist)
#   scripts/build-k8s.sh --print-bin-dir print the directory the binaries live in, build nothing
#
# Output: ${CHAOS_K8S_CACHE:-$HOME/.cache/chaos-train/k8s}/v<version>/bin/, published atomically.
# Environment: CHAOS_K8S_BUILD_JOBS (go build -p, default 1) keeps a small machine usable; the
# build also runs under `nice`. GOMODCACHE/GOCACHE are Go's own (outside the repository).
set -euo pipefail

K8S_VERSION=1.33.13 # pinned release; staging modules are tagged v0.33.13
BINARIES=(kube-apiserver kube-controller-manager kubectl)

CACHE_ROOT="${CHAOS_K8S_CACHE:-$HOME/.cache/chaos-train/k8s}"
OUT="$CACHE_ROOT/v$K8S_VERSION"
BIN="$OUT/bin"

source "$(dirname "$0")/build-lib.sh"
build_args build-k8s "$BIN" "$@"

have_all() {
  local b
  for b in "${BINARIES[@]}"; do [[ -x "$BIN/$b" ]] || return 1; done
}

have_all && exit 0

command -v go >/dev/null || die "Go is required (Kubernetes $K8S_VERSION needs Go >= 1.24)"

# One build at a time: a second caller waits here, then finds the binaries and exits.
build_lock "$OUT" "Kubernetes v$K8S_VERSION"
have_all && exit 0

start=$(date +%s)
minor=$(echo "$K8S_VERSION" | cut -d. -f2)
staging_tag="v0.${K8S_VERSION#1.}"
jobs="${CHAOS_K8S_BUILD_JOBS:-1}"
export CGO_ENABLED=0 GOFLAGS="-buildvcs=false" GOTOOLCHAIN="${GOTOOLCHAIN:-local}"

wrap="$OUT/wrapper"
rm -rf "$wrap" "$OUT/bin.partial"
mkdir -p "$wrap" "$OUT/bin.partial"
cd "$wrap"

log "Kubernetes v$K8S_VERSION with $(go version | cut -d' ' -f3), wrapper module in $wrap"
go mod init chaos.invalid/k8s-binaries 2>/dev/null

# 1. One replace per staging module, read from the release's own go.mod; copy its godebug line.
kmod=$(go mod download -json "k8s.io/kubernetes@v$K8S_VERSION" \
  | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d.get("GoMod") or sys.exit(d.get("Error")))') \
  || die "cannot download k8s.io/kubernetes@v$K8S_VERSION (is the Go module proxy reachable?)"
go mod edit -json "$kmod" | python3 -c '
import json, sys
mod = json.load(sys.stdin)
for rep in mod.get("Replace") or []:
    if rep["New"]["Path"].startswith("./staging/"):
        print("replace", rep["Old"]["Path"])
for dbg in mod.get("Godebug") or []:
    print("godebug", dbg["Key"] + "=" + dbg["Value"])' > directives.txt
nstaging=0
while read -r kind arg; do
  case "$kind" in
    replace) go mod edit -replace="$arg=$arg@$staging_tag"; nstaging=$((nstaging + 1)) ;;
    godebug) go mod edit -godebug="$arg" ;;
  esac
done < directives.txt
((nstaging > 0)) || die "no staging modules found in the go.mod of k8s.io/kubernetes@v$K8S_VERSION"
go mod edit -require="k8s.io/kubernetes@v$K8S_VERSION"
log "replaced $nstaging staging modules with $staging_tag"

# 2. Name the main packages so that `go mod tidy` keeps their dependencies.
{
  echo '//go:build tools'
  echo
  echo 'package tools'
  echo
  echo 'import ('
  for b in "${BINARIES[@]}"; do echo "	_ \"k8s.io/kubernetes/cmd/$b\""; done
  echo ')'
} > tools.go
log "resolving modules (go mod tidy; downloads a few hundred MB on a cold cache)"
go mod tidy || die "go mod tidy failed"

# 3. Build with the version stamps Kubernetes' own build sets (component-base for the servers,
#    client-go for kubectl's client version).
stamp=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  stamp+=" -X $pkg.gitVersion=v$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
  stamp+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done
pkgs=()
for b in "${BINARIES[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$b"); done
log "go build -p $jobs ${BINARIES[*]} (~10 min on 2 cores with cold Go caches, seconds when warm)"
nice -n 10 go build -p "$jobs" -trimpath -ldflags "-s -w$stamp" -o "$OUT/bin.partial/" "${pkgs[@]}" \
  || die "go build failed"

"$OUT/bin.partial/kube-apiserver" --version >&2
"$OUT/bin.partial/kubectl" version --client >&2
rm -rf "$BIN"
mv "$OUT/bin.partial" "$BIN"
log "done in $(($(date +%s) - start)) s: $BIN"
