#!/usr/bin/env bash
# Build the critbatch image on this machine and run one digits cell in it against a loopback S3 server.
#
#   CRITBATCH_IMAGE_TESTS=1 tests/image/run_image_test.sh      # minutes and a few GB of disk; run as root
#
# Opt-in (without CRITBATCH_IMAGE_TESTS=1 it only says so): no registry is reachable here, so it
#   1. starts its own dockerd (vfs storage, no bridge, no iptables) on a private socket,
#   2. makes a base image: debootstrap a bookworm minbase with python3, venv, pip and ca-certificates,
#      copies this machine's CA bundle over the rootfs's, adds a CPU-only torch wheel from /opt/wheels
#      when there is one, and `docker import`s it,
#   3. builds the repository's Dockerfile on that base (`docker build --network host`),
#   4. runs one shortened digits cell the way the cell Job does (torchrun --standalone, user 1000,
#      read-only root filesystem, scratch on tmpfs) against a SeaweedFS S3 server on loopback,
#      with --network host, and checks the cell's _SUCCESS in the store,
#   5. stops the S3 server and dockerd by their pids.
# The base image is kept in the work directory's docker data root for the next run
# (CRITBATCH_IMAGE_WORK, default /var/tmp/critbatch-image-test; delete it to start afresh).
set -euo pipefail

if [[ "${CRITBATCH_IMAGE_TESTS:-0}" != 1 ]]; then
  echo "image test skipped: set CRITBATCH_IMAGE_TESTS=1 to build and run the image (minutes, a few GB)"
  exit 0
fi

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
python="${PYTHON:-$repo/.venv/bin/python}"
work="${CRITBATCH_IMAGE_WORK:-/var/tmp/critbatch-image-test}"
base_image="critbatch-test-base:bookworm"
image="critbatch:image-test"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
bucket="image-test-$(date +%s)"
store="s3://$bucket/runs"
dockerd_pid=""
s3_pid=""

log() { printf '\n==> %s\n' "$*" >&2; }

cleanup() {
  if [[ -n "$s3_pid" ]]; then
    kill -TERM "$s3_pid" 2>/dev/null || true
    wait "$s3_pid" 2>/dev/null || true
  fi
  if [[ -n "$dockerd_pid" ]]; then
    kill -TERM "$dockerd_pid" 2>/dev/null || true
    wait "$dockerd_pid" 2>/dev/null || true
  fi
  if mountpoint -q "$work/rootfs/proc" 2>/dev/null; then
    umount "$work/rootfs/proc"
  fi
}
trap cleanup EXIT

for tool in dockerd docker debootstrap; do
  command -v "$tool" >/dev/null || { echo "run_image_test.sh: $tool missing (apt-get install docker.io debootstrap)" >&2; exit 2; }
done
mkdir -p "$work"
export DOCKER_HOST="unix://$work/docker.sock"

log "dockerd (vfs, no bridge, no iptables) on $DOCKER_HOST"
dockerd --storage-driver=vfs --bridge=none --iptables=false \
  --data-root "$work/docker" --exec-root "$work/exec" --pidfile "$work/dockerd.pid" \
  --host "$DOCKER_HOST" >"$work/dockerd.log" 2>&1 &
dockerd_pid=$!
for _ in $(seq 60); do
  docker info >/dev/null 2>&1 && break
  kill -0 "$dockerd_pid" 2>/dev/null || { tail -20 "$work/dockerd.log" >&2; exit 1; }
  sleep 1
done
docker info --format 'docker {{.ServerVersion}}, storage {{.Driver}}'

if docker image inspect "$base_image" >/dev/null 2>&1; then
  log "base image $base_image (kept from an earlier run)"
else
  log "base image: debootstrap bookworm minbase"
  rootfs="$work/rootfs"
  rm -rf "$rootfs"
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
  # pip inside the build verifies TLS against this bundle, not the rootfs's own.
  cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
  cp /etc/resolv.conf "$rootfs/etc/resolv.conf"
  wheel=""
  for candidate in /opt/wheels/torch-*+cpu-cp311-*.whl; do
    [[ -e "$candidate" ]] && wheel="$candidate"
  done
  if [[ -n "$wheel" ]]; then
    log "base image: CPU torch from $(basename "$wheel")"
    cp "$wheel" "$rootfs/tmp/"
    mount -t proc proc "$rootfs/proc"
    chroot "$rootfs" python3 -m pip install --break-system-packages --no-cache-dir --root-user-action=ignore \
      "/tmp/$(basename "$wheel")"
    umount "$rootfs/proc"
    rm -f "$rootfs/tmp/$(basename "$wheel")"
  fi
  tar -C "$rootfs" -c . | docker import - "$base_image"
  rm -rf "$rootfs"
fi

log "docker build --network host on $base_image"
install_torch=auto
if docker run --rm --network host --entrypoint python3 "$base_image" -c "import torch" 2>/dev/null; then
  install_torch=never  # keep the base's CPU torch; digits needs no torchvision
fi
started=$(date +%s)
docker build --network host --build-arg BASE_IMAGE="$base_image" --build-arg INSTALL_TORCH="$install_torch" \
  --tag "$image" "$repo"
echo "built $image in $(( $(date +%s) - started )) s"
docker image ls "$image"

log "S3 server on loopback"
"$python" -u - >"$work/s3.env" 2>"$work/s3.log" <<'PY' &
import json, signal, sys, tempfile, time
from critbatch.jobs.s3server import S3Server
server = S3Server(tempfile.mkdtemp(prefix="critbatch-image-s3-"))
server.start()
signal.signal(signal.SIGTERM, lambda *_: (server.stop(), sys.exit(0)))
print(json.dumps(server.env()), flush=True)
while True:
    time.sleep(1)
PY
s3_pid=$!
for _ in $(seq 60); do
  [[ -s "$work/s3.env" ]] && break
  kill -0 "$s3_pid" 2>/dev/null || { cat "$work/s3.log" >&2; exit 1; }
  sleep 1
done
env_args=()
while IFS= read -r line; do
  env_args+=(--env "$line")
done < <("$python" -c 'import json,sys; [print(f"{k}={v}") for k, v in json.load(sys.stdin).items()]' <"$work/s3.env")

log "one digits cell in the container, as the cell Job runs it"
cell="$("$python" - <<'PY'
import json
from critbatch.jobs.grid import load_grid
cell = load_grid("digits").cells()[0]
data = cell.to_dict()
data.update(sweep="image-test", max_steps=40, epochs=2.0)
data["eval"]["points"] = 4
print(json.dumps(data, sort_keys=True, separators=(",", ":")))
PY
)"
docker run --rm --network host --user 1000:1000 --read-only \
  --tmpfs /tmp:exec --tmpfs /home/critbatch --tmpfs /var/cache/critbatch \
  --env HOME=/home/critbatch --env TMPDIR=/tmp --env MPLCONFIGDIR=/var/cache/critbatch/matplotlib \
  "${env_args[@]}" --env CRITBATCH_STORE="$store" \
  --entrypoint torchrun "$image" --standalone --nproc-per-node=1 \
  -m critbatch.jobs.cli train --cell "$cell" --store "$store" --progress lines

log "the cell's _SUCCESS in the store"
set -a
# shellcheck disable=SC1090
source <("$python" -c 'import json,sys; [print(f"{k}={v}") for k, v in json.load(sys.stdin).items()]' <"$work/s3.env")
set +a
"$python" - "$store" "$cell" <<'PY'
import json, sys
from critbatch.jobs.config import Cell
from critbatch.jobs.store import open_store, success_key
store, cell = open_store(sys.argv[1]), Cell.from_json(sys.argv[2])
summary = json.loads(store.get_text(success_key(cell.sweep, cell.id)))
print(json.dumps(summary, indent=1, sort_keys=True)[:1500])
assert summary["status"] in ("done", "diverged"), summary
print(f"image test passed: cell {cell.id} -> {summary['status']}")
PY
