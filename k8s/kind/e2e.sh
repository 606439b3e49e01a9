#!/usr/bin/env bash
# End to end on a local kind cluster: a small digits sweep (k8s/kind/grid.yaml) from manifests to report.
#
#   k8s/kind/e2e.sh                 # create the cluster, build and load the image, run, copy the report
#   KEEP_CLUSTER=1 k8s/kind/e2e.sh  # leave the cluster up afterwards (default: delete it)
#
# Needs docker, kind and kubectl on PATH; nothing else on the host (critbatch itself runs in the image).
# Steps: create the kind cluster; build the image and load it (docker save | kind load image-archive,
# which works with Docker's containerd image store too); apply the cluster kit with a freshly generated
# store Secret; render the grid's cells inside the image and apply them; wait for every cell Job,
# failing at once on a failed Job or a stuck pod; apply the analysis Job and wait for it; copy the
# report to ./critbatch-report/. Every pod asks for 1 CPU and at most 1.5 GiB, so a laptop's Docker fits it.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cluster="${CLUSTER:-critbatch}"
image="${IMAGE:-critbatch:dev}"
namespace=critbatch
grid="$repo/k8s/kind/grid.yaml"
sweep=digits-kind
store="s3://critbatch/runs"
report_dir="${REPORT_DIR:-$PWD/critbatch-report}"
timeout_s="${TIMEOUT_SECONDS:-3600}"
work="$(mktemp -d)"
port_forward_pid=""

log() { printf '\n==> %s\n' "$*" >&2; }

cleanup() {
  if [[ -n "$port_forward_pid" ]]; then
    kill "$port_forward_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
  if [[ "${KEEP_CLUSTER:-0}" != 1 ]]; then
    kind delete cluster --name "$cluster" || true
  fi
}

# critbatch in the image, with the grid file mounted where its commands read it.
critbatch() {
  docker run --rm -v "$grid:/grid.yaml:ro" "$image" "$@"
}

# wait_for_jobs SELECTOR COUNT: until COUNT Jobs match and all are Complete. Fails at once when one is
# Failed (a bad cell is not waited on for the whole timeout) or a pod is stuck where it cannot recover
# by itself (image not loaded or not pullable, missing Secret or key), showing what Kubernetes says.
wait_for_jobs() {
  local selector="$1" count="$2" deadline=$((SECONDS + timeout_s)) states stuck complete
  while ((SECONDS < deadline)); do
    states="$(kubectl -n "$namespace" get jobs -l "$selector" \
      -o jsonpath='{range .items[*]}{.metadata.name}{" "}{.status.conditions[?(@.status=="True")].type}{"\n"}{end}')"
    if grep -qw Failed <<<"$states"; then
      echo "e2e.sh: a Job failed:" >&2
      grep -w Failed <<<"$states" >&2
      kubectl -n "$namespace" describe jobs -l "$selector" | grep -A3 -E '^Conditions|Events' >&2 || true
      kubectl -n "$namespace" logs -l "$selector" --tail=30 --prefix >&2 || true
      return 1
    fi
    stuck="$(kubectl -n "$namespace" get pods -l "$selector" \
      -o jsonpath='{range .items[*]}{.metadata.name}{" "}{.status.containerStatuses[*].state.waiting.reason}{"\n"}{end}' \
      | grep -E 'ErrImagePull|ImagePullBackOff|ErrImageNeverPull|InvalidImageName|CreateContainerConfigError' || true)"
    if [[ -n "$stuck" ]]; then
      echo "e2e.sh: pods that cannot start:" >&2
      echo "$stuck" >&2
      kubectl -n "$namespace" describe pods -l "$selector" | grep -A8 '^Events' >&2 || true
      return 1
    fi
    complete="$(grep -cw Complete <<<"$states" || true)"
    if ((complete == count)); then
      return 0
    fi
    printf '  %s of %s complete\r' "$complete" "$count" >&2
    sleep 5
  done
  echo "e2e.sh: $selector: not complete after ${timeout_s} s" >&2
  return 1
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
s3_json="$work/s3.json"
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

log "render the $sweep cells (in the image) and apply them"
critbatch render /grid.yaml --image "$image" --store "$store" --namespace "$namespace" >"$work/cells.yaml"
kubectl apply -f "$work/cells.yaml"
cells="$(grep -c '^kind: Job$' "$work/cells.yaml")"

log "wait for the $cells cells"
wait_for_jobs "critbatch.io/sweep=$sweep,app.kubernetes.io/component=cell" "$cells"

log "analysis"
critbatch render /grid.yaml --analysis --image "$image" --store "$store" --namespace "$namespace" \
  | kubectl apply -f -
wait_for_jobs "critbatch.io/sweep=$sweep,app.kubernetes.io/component=analysis" 1
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
