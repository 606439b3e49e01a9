#!/usr/bin/env bash
# Build the critbatch image, and optionally load it into a kind cluster.
#
#   images/build.sh                                   # critbatch:latest on the default CUDA PyTorch base
#   images/build.sh --tag critbatch:dev --kind critbatch
#   images/build.sh --base my-registry/python:3.11 --network host
#
# Extra arguments after -- go to `docker build` unchanged.
set -euo pipefail

usage() {
  sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
}

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tag="critbatch:latest"
base=""
kind_cluster=""
network=""
extra=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    --tag) tag="$2"; shift 2 ;;
    --base) base="$2"; shift 2 ;;
    --kind) kind_cluster="$2"; shift 2 ;;
    --network) network="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "build.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
done

commit="$(git -C "$repo" describe --always --dirty 2>/dev/null || true)"
args=(build --tag "$tag" --file "$repo/Dockerfile" --build-arg "CRITBATCH_COMMIT=$commit")
if [[ -n "$base" ]]; then
  args+=(--build-arg "BASE_IMAGE=$base")
fi
if [[ -n "$network" ]]; then
  args+=(--network "$network")
fi
docker "${args[@]}" "${extra[@]}" "$repo"

if [[ -n "$kind_cluster" ]]; then
  # `kind load docker-image` fails with Docker's containerd image store (its export lacks the layers it
  # expects); an archive from `docker save` loads with either store.
  scratch="$(mktemp -d)"
  trap 'rm -rf "$scratch"' EXIT
  archive="$scratch/image.tar"
  docker save --output "$archive" "$tag"
  kind load image-archive "$archive" --name "$kind_cluster"
fi
echo "built $tag${kind_cluster:+ and loaded it into kind cluster $kind_cluster}"
