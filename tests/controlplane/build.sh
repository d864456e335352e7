#!/usr/bin/env bash
# Build etcd, kube-apiserver, kube-controller-manager and kubectl from the Go module proxy.
# (kubectl is for the manifest tests: `kubectl kustomize` renders the overlays and
# `kubectl apply --dry-run=server` checks them against this very apiserver version.)
#
# Why a wrapper module: k8s.io/kubernetes requires its staging modules at v0.0.0 and relies on
# replace directives that do not apply to dependents, and `go install pkg@version` refuses modules
# with replace directives. So a throwaway module requires k8s.io/kubernetes at a pinned release and
# replaces every staging module by its published v0.<minor>.<patch> twin, generated from that
# release's own go.mod. etcd's server module has replace directives too, hence a second wrapper.
#
# Binaries land in $RELOADER_TESTENV_CACHE/<k8s version>/ (default ~/.cache/reloader-testenv), outside
# the checkout; a later run with the binaries present and stamped with the right version does nothing.
# Go's own build and module caches (GOCACHE, GOMODCACHE) are outside the checkout as well, so a warm
# machine rebuilds in about a minute. Prints the binary directory on its last line.
set -euo pipefail

K8S_VERSION="${RELOADER_K8S_VERSION:-1.37.2}"
ETCD_VERSION="${RELOADER_ETCD_VERSION:-v3.6.16}"
CACHE_ROOT="${RELOADER_TESTENV_CACHE:-$HOME/.cache/reloader-testenv}"
OUT="$CACHE_ROOT/$K8S_VERSION"
STAGING_VERSION="v0.${K8S_VERSION#1.}"
MINOR="$(echo "$K8S_VERSION" | cut -d. -f2)"

log() { echo "build-control-plane: $*" >&2; }

# No `grep -q`: it exits at the first match, and a binary still printing its next version line then
# dies of SIGPIPE, which fails the pipeline (pipefail) and so the check, about one run in five.
is_built() {
  [ -x "$OUT/kube-apiserver" ] && [ -x "$OUT/kube-controller-manager" ] && [ -x "$OUT/etcd" ] \
    && [ -x "$OUT/kubectl" ] \
    && "$OUT/kube-apiserver" --version 2>/dev/null | grep -x "Kubernetes v$K8S_VERSION" >/dev/null \
    && "$OUT/kubectl" version --client 2>/dev/null | grep -x "Client Version: v$K8S_VERSION" >/dev/null \
    && "$OUT/etcd" --version 2>/dev/null | grep "etcd Version: ${ETCD_VERSION#v}" >/dev/null
}

if [ -n "${RELOADER_TESTENV_BIN:-}" ]; then
  log "using the binaries in RELOADER_TESTENV_BIN=$RELOADER_TESTENV_BIN (not building)"
  echo "$RELOADER_TESTENV_BIN"
  exit 0
fi

if is_built && [ "${1:-}" != node ]; then
  log "binaries for Kubernetes v$K8S_VERSION and etcd $ETCD_VERSION already in $OUT"
  echo "$OUT"
  exit 0
fi

command -v go >/dev/null || { log "Go is required to build the test control plane"; exit 1; }
mkdir -p "$OUT"
export CGO_ENABLED=0 GOFLAGS=-mod=mod GOTOOLCHAIN="${GOTOOLCHAIN:-local}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

build_kubernetes() {
  local dir="$WORK/k8s"
  mkdir -p "$dir" && cd "$dir"
  go mod init local/reloader-k8s-binaries >/dev/null 2>&1
  local gomod
  gomod="$(go mod download -json "k8s.io/kubernetes@v$K8S_VERSION" \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')"
  local module
  for module in $(awk '$1 ~ /^k8s\.io\// && $2 == "v0.0.0" {print $1}' "$gomod" | sort -u); do
    go mod edit -replace="$module=$module@$STAGING_VERSION"
  done
  go mod edit -require="k8s.io/kubernetes@v$K8S_VERSION"
  cat > tools.go <<GO
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
GO
  log "resolving k8s.io/kubernetes v$K8S_VERSION modules"
  go mod tidy -e >/dev/null 2>"$WORK/tidy.log" || { cat "$WORK/tidy.log" >&2; exit 1; }
  # Servers read their version from component-base, kubectl's client half from client-go: stamp both.
  local ldflags="-s -w" stamp
  for stamp in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags="$ldflags -X $stamp.gitVersion=v$K8S_VERSION -X $stamp.gitMajor=1 -X $stamp.gitMinor=$MINOR"
    ldflags="$ldflags -X $stamp.gitTreeState=clean -X $stamp.buildDate=1970-01-01T00:00:00Z"
  done
  log "building kube-apiserver, kube-controller-manager and kubectl (a cold build takes 10-20 minutes)"
  go build -trimpath -ldflags "$ldflags" -o "$OUT/" \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kubectl
}

build_etcd() {
  local dir="$WORK/etcd"
  mkdir -p "$dir" && cd "$dir"
  go mod init local/reloader-etcd-binary >/dev/null 2>&1
  go mod edit -require="go.etcd.io/etcd/server/v3@$ETCD_VERSION"
  cat > tools.go <<GO
//go:build tools

package tools

import _ "go.etcd.io/etcd/server/v3"
GO
  log "resolving etcd $ETCD_VERSION modules"
  go mod tidy -e >/dev/null 2>"$WORK/tidy-etcd.log" || { cat "$WORK/tidy-etcd.log" >&2; exit 1; }
  log "building etcd"
  go build -trimpath -ldflags "-s -w" -o "$OUT/etcd" go.etcd.io/etcd/server/v3
}

# `build.sh node`: what a node needs as well: kubelet, kube-proxy and kube-scheduler (tests/node). Built
# apart from the control plane so that machines without the node never pay for them. Same wrapper
# module and version stamps; kubelet v1.37 is within the skew policy of a v1.37 apiserver.
node_is_built() {
  [ -x "$OUT/kubelet" ] && [ -x "$OUT/kube-proxy" ] && [ -x "$OUT/kube-scheduler" ] \
    && "$OUT/kubelet" --version 2>/dev/null | grep -x "Kubernetes v$K8S_VERSION" >/dev/null \
    && "$OUT/kube-proxy" --version 2>/dev/null | grep -x "Kubernetes v$K8S_VERSION" >/dev/null \
    && "$OUT/kube-scheduler" --version 2>/dev/null | grep -x "Kubernetes v$K8S_VERSION" >/dev/null
}

build_node() {
  local dir="$WORK/k8s-node"
  mkdir -p "$dir" && cd "$dir"
  go mod init local/reloader-k8s-node-binaries >/dev/null 2>&1
  local gomod module
  gomod="$(go mod download -json "k8s.io/kubernetes@v$K8S_VERSION" \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')"
  for module in $(awk '$1 ~ /^k8s\.io\// && $2 == "v0.0.0" {print $1}' "$gomod" | sort -u); do
    go mod edit -replace="$module=$module@$STAGING_VERSION"
  done
  go mod edit -require="k8s.io/kubernetes@v$K8S_VERSION"
  cat > tools.go <<GO
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
GO
  log "resolving k8s.io/kubernetes v$K8S_VERSION modules for the node"
  go mod tidy -e >/dev/null 2>"$WORK/tidy-node.log" || { cat "$WORK/tidy-node.log" >&2; exit 1; }
  local ldflags="-s -w" stamp="k8s.io/component-base/version"
  ldflags="$ldflags -X $stamp.gitVersion=v$K8S_VERSION -X $stamp.gitMajor=1 -X $stamp.gitMinor=$MINOR"
  ldflags="$ldflags -X $stamp.gitTreeState=clean -X $stamp.buildDate=1970-01-01T00:00:00Z"
  log "building kubelet, kube-proxy and kube-scheduler (a cold build takes 5-10 minutes)"
  go build -trimpath -ldflags "$ldflags" -o "$OUT/" \
    k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-proxy k8s.io/kubernetes/cmd/kube-scheduler
}

if ! is_built; then
  (build_etcd)
  (build_kubernetes)
  is_built || { log "built binaries do not report the expected versions"; exit 1; }
fi
if [ "${1:-}" = node ] && ! node_is_built; then
  (build_node)
  node_is_built || { log "built node binaries do not report the expected versions"; exit 1; }
fi
log "done: $OUT"
echo "$OUT"
