#!/usr/bin/env bash
# Builds Kueue from its official Go module and keeps, beside the binary, what
# the local cluster needs from the module source: the CRDs
# (config/components/crd/bases/) and the webhook manifests
# (config/components/webhook/manifests.yaml). Everything lives in
# ~/.cache/kubetune/bin/kueue-<version>/ and is built only when missing, so a
# warm machine is ready at once. Prints that folder on its last line.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"

cache=${KUBETUNE_CACHE:-$HOME/.cache/kubetune}
bin="$cache/bin/kueue-${KUEUE_VERSION}"
mkdir -p "$bin"

export CGO_ENABLED=0 GOTOOLCHAIN=local GOWORK=off GOFLAGS=-trimpath
command -v go >/dev/null || { echo "error: Go (1.26 or newer) is needed to build Kueue" >&2; exit 1; }

log() { printf '[build-kueue] %s\n' "$*" >&2; }

# Build into a scratch folder, then move into place: an interrupted build
# never leaves a half-written binary (or half-copied manifests) that would
# count as present.
stage=$(mktemp -d "$bin/.stage.XXXXXX")
trap 'rm -rf "$stage"' EXIT

if [ ! -x "$bin/kueue" ]; then
  log "building Kueue ${KUEUE_VERSION} (cold: about 6 minutes on 2 cores)"
  GOBIN="$stage" go install -ldflags "-s -w -X sigs.k8s.io/kueue/pkg/version.GitVersion=${KUEUE_VERSION}" \
    "sigs.k8s.io/kueue/cmd/kueue@${KUEUE_VERSION}"
  mv "$stage/kueue" "$bin/kueue"
fi

if [ ! -f "$bin/webhook-manifests.yaml" ] || [ ! -d "$bin/crds" ]; then
  log "copying the CRDs and webhook manifests of sigs.k8s.io/kueue@${KUEUE_VERSION}"
  src=$(go mod download -json "sigs.k8s.io/kueue@${KUEUE_VERSION}" \
    | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p')
  [ -d "$src/config/components/crd/bases" ] || { echo "error: no Kueue module source at '$src'" >&2; exit 1; }
  mkdir -p "$stage/crds"
  cp "$src"/config/components/crd/bases/*.yaml "$stage/crds/"
  chmod -R u+w "$stage/crds"
  rm -rf "$bin/crds"
  mv "$stage/crds" "$bin/crds"
  cp "$src/config/components/webhook/manifests.yaml" "$stage/webhook-manifests.yaml"
  chmod u+w "$stage/webhook-manifests.yaml"
  mv "$stage/webhook-manifests.yaml" "$bin/webhook-manifests.yaml"
fi

echo "$bin"
