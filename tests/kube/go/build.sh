#!/usr/bin/env bash
# Builds the cluster tests' control plane once per machine and prints the
# folder that holds it: etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler and kubectl, built with Go from the module beside this
# script (Kubernetes and etcd from the Go module proxy). The folder is keyed by
# the Kubernetes version and a hash of the module files, so a new pin builds
# anew and an unchanged one is reused:
#   ${CRITBATCH_K8S_CACHE:-~/.cache/critbatch/controlplane}/<version>-<hash>/
# The first build takes about 10-15 minutes on two cores and 3 GB of Go's
# build cache; later calls return at once.
#
# Beside the binaries, crds/ holds the ClusterTrainingRuntime CRD of Kubeflow Trainer, read from its Go
# module (TRAINER_MODULE below; the TrainJob and PyTorchJob CRDs come from shared/schemas).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
version="$(awk '$1 == "k8s.io/kubernetes" && $2 ~ /^v/ {print $2; exit}' "$here/go.mod")"
[ -n "$version" ] || { echo "build.sh: no k8s.io/kubernetes version in $here/go.mod" >&2; exit 2; }
command -v go >/dev/null || { echo "build.sh: Go is needed to build the control plane (the Go release named in $here/go.mod or later 1.26.x)" >&2; exit 2; }
hash="$(cat "$here/go.mod" "$here/go.sum" "$here/etcd/main.go" "$0" | sha256sum | cut -c1-12)"
out="${CRITBATCH_K8S_CACHE:-$HOME/.cache/critbatch/controlplane}/$version-$hash"
bins=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl)
TRAINER_MODULE=github.com/kubeflow/trainer/v2@v2.0.0
RUNTIME_CRD=trainer.kubeflow.org_clustertrainingruntimes.yaml

complete() { for b in "${bins[@]}"; do [ -x "$1/$b" ] || return 1; done; }
# The module is only read (its manifests), never built: downloaded from outside this module, so that its
# requirements do not enter this module's graph.
fetch_crds() {
  local dir
  dir="$(cd "$1" && GOFLAGS= go mod download -json "$TRAINER_MODULE" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
  [ -n "$dir" ] || { echo "build.sh: could not download $TRAINER_MODULE" >&2; return 1; }
  mkdir -p "$1/crds"
  install -m 644 "$dir/manifests/base/crds/$RUNTIME_CRD" "$1/crds/$RUNTIME_CRD"
}
if complete "$out"; then
  [ -f "$out/crds/$RUNTIME_CRD" ] || fetch_crds "$out"
  echo "$out"; exit 0
fi

echo "build.sh: building Kubernetes $version and etcd into $out (once per machine: 10-15 minutes on two quiet cores, longer on busy ones)" >&2
start=$(date +%s)
tmp="$out.partial.$$"
rm -rf "$tmp"; mkdir -p "$tmp"
trap 'rm -rf "$tmp"' EXIT
minor="${version#v1.}"; minor="${minor%%.*}"
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X $pkg.gitVersion=$version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
done
cd "$here"
# One go build for all four, so the packages they share compile once.
CGO_ENABLED=0 go build -trimpath -ldflags "$ldflags" -o "$tmp/" \
  k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl
CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$tmp/etcd" ./etcd
fetch_crds "$tmp"
complete "$tmp" || { echo "build.sh: the build left no complete set of binaries in $tmp" >&2; exit 1; }
mkdir -p "$(dirname "$out")"
rm -rf "$out"; mv "$tmp" "$out"
trap - EXIT
echo "build.sh: built in $(( $(date +%s) - start )) s" >&2
echo "$out"
