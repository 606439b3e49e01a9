#!/usr/bin/env bash
# End to end on a local kind cluster: the digits sweep from manifests to report.
#
#   k8s/kind/e2e.sh                 # create the cluster, build and load the image, run, copy the report
#   KEEP_CLUSTER=1 k8s/kind/e2e.sh  # leave the cluster up afterwards (default: delete it)
#
# Needs docker, kind and kubectl on PATH; nothing else on the host (critbatch itself runs in the image).
# Steps: create the kind cluster; build the image and `kind load docker-image` it; apply the cluster kit
# with a freshly generated store Secret; render the digits preset inside the image and apply it; wait for
# every cell Job; resume the analysis Job and wait for it; copy the report to ./critbatch-report/.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cluster="${CLUSTER:-critbatch}"
image="${IMAGE:-critbatch:dev}"
namespace=critbatch
sweep=digits
store="s3://critbatch/runs"
report_dir="${REPORT_DIR:-$PWD/critbatch-report}"
timeout="${TIMEOUT:-3600s}"
port_forward_pid=""

log() { printf '\n==> %s\n' "$*" >&2; }

cleanup() {
  if [[ -n "$port_forward_pid" ]]; then
    kill "$port_forward_pid" 2>/dev/null || true
  fi
  if [[ "${KEEP_CLUSTER:-0}" != 1 ]]; then
    kind delete cluster --name "$cluster" || true
  fi
}

for tool in docker kind kubectl; do
  command -v "$tool" >/dev/null || { echo "e2e.sh: $tool is not on PATH" >&2; exit 2; }
done

log "kind cluster $cluster"
if ! kind get clusters | grep -qx "$cluster"; then
  kind create cluster --name "$cluster" --config "$repo/k8s/kind/cluster.yaml" --wait 120s
fi
trap cleanup EXIT
kubectl config use-context "kind-$cluster" >/dev/null

log "image $image"
"$repo/images/build.sh" --tag "$image" --kind "$cluster"

log "cluster kit (namespace, service account, SeaweedFS S3) with a generated store Secret"
kubectl apply -f "$repo/k8s/namespace.yaml"
access_key="critbatch$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')"
secret_key="$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')"
s3_json="$(mktemp)"
printf '{"identities":[{"name":"critbatch","credentials":[{"accessKey":"%s","secretKey":"%s"}],"actions":["Admin","Read","Write","List","Tagging"]}]}\n' \
  "$access_key" "$secret_key" >"$s3_json"
kubectl -n "$namespace" create secret generic critbatch-store \
  --from-literal=AWS_ACCESS_KEY_ID="$access_key" \
  --from-literal=AWS_SECRET_ACCESS_KEY="$secret_key" \
  --from-file=s3.json="$s3_json" \
  --dry-run=client -o yaml | kubectl apply -f -
rm -f "$s3_json"
kubectl apply -k "$repo/k8s"
kubectl -n "$namespace" rollout status deployment/critbatch-s3 --timeout=300s

log "render the $sweep sweep (in the image) and apply it"
docker run --rm "$image" render "$sweep" --image "$image" --store "$store" --namespace "$namespace" \
  | kubectl apply -f -

log "wait for every cell"
kubectl -n "$namespace" wait job --for=condition=complete --timeout="$timeout" \
  -l "critbatch.io/sweep=$sweep,app.kubernetes.io/component=cell"

log "analysis"
kubectl -n "$namespace" patch job "critbatch-$sweep-analysis" --type merge -p '{"spec":{"suspend":false}}'
kubectl -n "$namespace" wait job "critbatch-$sweep-analysis" --for=condition=complete --timeout="$timeout"
kubectl -n "$namespace" logs "job/critbatch-$sweep-analysis" --tail=20

log "copy the report to $report_dir"
kubectl -n "$namespace" port-forward service/critbatch-s3 18333:8333 >/dev/null &
port_forward_pid=$!
sleep 3
mkdir -p "$report_dir"
docker run --rm --network host --user "$(id -u):$(id -g)" -v "$report_dir:/report" \
  -e AWS_ACCESS_KEY_ID="$access_key" -e AWS_SECRET_ACCESS_KEY="$secret_key" \
  -e AWS_ENDPOINT_URL=http://127.0.0.1:18333 -e HOME=/tmp \
  --entrypoint python "$image" -c '
import pathlib, sys
from critbatch.jobs.store import open_store
from critbatch.jobs.cell.layout import report_prefix
store, sweep = open_store(sys.argv[1]), sys.argv[2]
for key in store.list(report_prefix(sweep)):
    path = pathlib.Path("/report") / key[len(report_prefix(sweep)) + 1:]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(store.get_bytes(key))
    print(path)
' "$store" "$sweep"
log "done: open $report_dir/index.html"
