#!/usr/bin/env bash
# Builds the peer operators that bench/peers.py compares kubetune with, from
# their official Go modules, and keeps beside each binary what the local
# cluster needs from the module source. Today: the Kubeflow training-operator
# (binary training-operator.v1, and its PyTorchJob CRD under crds/), in
# ~/.cache/kubetune/bin/training-operator-<version>/. Built only when missing,
# so a warm machine is ready at once. Prints that folder on its last line.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"

cache=${KUBETUNE_CACHE:-$HOME/.cache/kubetune}
bin="$cache/bin/training-operator-${TRAINING_OPERATOR_VERSION}"
mkdir -p "$bin"

export CGO_ENABLED=0 GOTOOLCHAIN=local GOWORK=off GOFLAGS=-trimpath
command -v go >/dev/null || { echo "error: Go (1.26 or newer) is needed to build the training-operator" >&2; exit 1; }

log() { printf '[build-peers] %s\n' "$*" >&2; }

module=github.com/kubeflow/training-operator

# Build into a scratch folder, then move into place: an interrupted build
# never leaves a half-written binary (or half-copied CRDs) that would count
# as present.
stage=$(mktemp -d "$bin/.stage.XXXXXX")
trap 'rm -rf "$stage"' EXIT

if [ ! -x "$bin/training-operator.v1" ]; then
  log "building the training-operator ${TRAINING_OPERATOR_VERSION} (cold: about 2 minutes on 2 cores)"
  GOBIN="$stage" go install -ldflags "-s -w" "$module/cmd/training-operator.v1@${TRAINING_OPERATOR_VERSION}"
  mv "$stage/training-operator.v1" "$bin/training-operator.v1"
fi

if [ ! -f "$bin/crds/kubeflow.org_pytorchjobs.yaml" ]; then
  log "copying the PyTorchJob CRD of $module@${TRAINING_OPERATOR_VERSION}"
  src=$(go mod download -json "$module@${TRAINING_OPERATOR_VERSION}" \
    | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p')
  crd="$src/manifests/base/crds/kubeflow.org_pytorchjobs.yaml"
  [ -f "$crd" ] || { echo "error: no training-operator module source at '$src'" >&2; exit 1; }
  mkdir -p "$stage/crds"
  cp "$crd" "$stage/crds/"
  chmod -R u+w "$stage/crds"
  rm -rf "$bin/crds"
  mv "$stage/crds" "$bin/crds"
fi

echo "$bin"
