#!/usr/bin/env bash
# Builds the local control plane and its tools from the official Go modules:
# kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, etcd,
# kwok, kwokctl and helm. Each binary is built only when missing from
# ~/.cache/kubetune/bin/<key>/, so a warm machine starts in seconds.
# Prints the binary folder on its last line.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"

cache=${KUBETUNE_CACHE:-$HOME/.cache/kubetune}
key="k8s-${KUBERNETES_VERSION}_etcd-${ETCD_VERSION}_kwok-${KWOK_VERSION}_helm-${HELM_VERSION}"
bin="$cache/bin/$key"
mkdir -p "$bin"

export CGO_ENABLED=0 GOTOOLCHAIN=local GOWORK=off GOFLAGS=-trimpath
command -v go >/dev/null || { echo "error: Go (1.26 or newer) is needed to build the control plane" >&2; exit 1; }

log() { printf '[build-tools] %s\n' "$*" >&2; }
missing() { for b in "$@"; do [ -x "$bin/$b" ] || return 0; done; return 1; }

# Build into a scratch folder, then move into place: an interrupted build
# never leaves a half-written binary that would count as present.
stage=$(mktemp -d "$bin/.stage.XXXXXX")
trap 'rm -rf "$stage"' EXIT

kube_bins=(kube-apiserver kube-controller-manager kube-scheduler kubectl)
if missing "${kube_bins[@]}"; then
  log "building Kubernetes ${KUBERNETES_VERSION} (cold: tens of minutes on 2 cores)"
  ver=${KUBERNETES_VERSION#v}
  major=${ver%%.*}; rest=${ver#*.}; minor=${rest%%.*}
  ldflags="-s -w"
  for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
    ldflags+=" -X $pkg.gitVersion=${KUBERNETES_VERSION} -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitCommit=v${ver} -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  (cd "$here/tools/kubernetes" && go build -ldflags "$ldflags" -o "$stage/" \
    k8s.io/kubernetes/cmd/kube-apiserver \
    k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler \
    k8s.io/kubernetes/cmd/kubectl)
  for b in "${kube_bins[@]}"; do mv "$stage/$b" "$bin/$b"; done
fi

if missing etcd; then
  log "building etcd ${ETCD_VERSION}"
  (cd "$here/tools/etcd" && go build -ldflags "-s -w" -o "$stage/etcd" .)
  mv "$stage/etcd" "$bin/etcd"
fi

if missing kwok kwokctl; then
  log "building KWOK ${KWOK_VERSION}"
  ldflags="-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=${KWOK_VERSION} -X sigs.k8s.io/kwok/pkg/consts.KubeVersion=${KUBERNETES_VERSION}"
  GOBIN="$stage" go install -ldflags "$ldflags" \
    "sigs.k8s.io/kwok/cmd/kwok@${KWOK_VERSION}" "sigs.k8s.io/kwok/cmd/kwokctl@${KWOK_VERSION}"
  mv "$stage/kwok" "$stage/kwokctl" "$bin/"
fi

if missing helm; then
  log "building helm ${HELM_VERSION}"
  GOBIN="$stage" go install -ldflags "-s -w -X helm.sh/helm/v4/internal/version.version=${HELM_VERSION}" \
    "helm.sh/helm/v4/cmd/helm@${HELM_VERSION}"
  mv "$stage/helm" "$bin/helm"
fi

echo "$bin"
