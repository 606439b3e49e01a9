#!/usr/bin/env bash
# Build the critbatch image on a locally made Debian base and run one digits cell in it against an S3 server
# on loopback, the way a cell pod runs it (the launcher, non-root, read-only root filesystem, writable tmpfs
# scratch). Slow (a multi-GB torch install inside the build), so it only runs when asked:
#
#   CRITBATCH_IMAGE_TESTS=1 tests/image/run_image_test.sh
#
# Needs root (it starts its own dockerd and runs debootstrap) and the repository's .venv (the S3 server and
# the store checks run on the host). No image registry is needed: the base is debootstrapped and imported.
#
# Environment:
#   CRITBATCH_IMAGE_WORKDIR         work dir: base rootfs cache, docker data root, logs (/var/tmp/critbatch-image)
#   CRITBATCH_IMAGE_STORAGE_DRIVER  dockerd storage driver; default overlay2, falling back to vfs if it fails
#   CRITBATCH_IMAGE_KEEP=1          keep the docker data root (and so the image) afterwards; default: remove it
#   CRITBATCH_DEBIAN_MIRROR         mirror for debootstrap (its default otherwise)
#   CRITBATCH_PYTHON                host Python with critbatch installed (default: <repo>/.venv/bin/python)
set -euo pipefail

if [[ "${CRITBATCH_IMAGE_TESTS:-0}" != 1 ]]; then
  echo "critbatch image test: skipped: set CRITBATCH_IMAGE_TESTS=1 to build and run the image (slow)"
  exit 0
fi

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
work="${CRITBATCH_IMAGE_WORKDIR:-/var/tmp/critbatch-image}"
py="${CRITBATCH_PYTHON:-$repo/.venv/bin/python}"
driver="${CRITBATCH_IMAGE_STORAGE_DRIVER:-}"
base_image="critbatch-base:bookworm"
image="critbatch:test"
store="s3://critbatch-image-test/runs"
# 22 steps per epoch at batch 64 on digits' 1437 training images; 50 steps in three log parts of <= 20.
cell='{"dataset": {"name": "digits"}, "model": "digits_cnn", "strategy": "lsr", "batch_size": 64,
"base_lr": 0.05, "base_batch": 32, "epochs": 3, "warmup_epochs": 1, "sweep": "image-test",
"eval": {"points": 8, "train_subset": 300}, "noise": {"every": 10}, "max_steps": 50}'
cell="$(tr -d '\n' <<<"$cell")"
min_free_gb=25

logs="$work/logs"
docker_root="$work/docker"
dockerd_pid=""
s3_pid=""
s3_dir=""
started=$SECONDS
current=""
phase_t0=$SECONDS
timings=()
checks=()
failed=0
image_size="?"
base_size="?"

say() { printf '==> %s\n' "$*"; }

check() {  # check NAME ok|fail [DETAIL]
  if [[ "$2" == ok ]]; then
    checks+=("  ok    $1${3:+: $3}")
  else
    checks+=("  FAIL  $1${3:+: $3}")
    failed=1
  fi
}

# phase NAME CMD...: one step, timed; under set -e a failing command ends the run, and the EXIT trap
# names the step it happened in.
phase() {
  phase_t0=$SECONDS
  current="$1"
  shift
  say "$current"
  "$@"
  timings+=("$current $((SECONDS - phase_t0))")
  current=""
}

show_log() {  # the end of a log, indented, for a failing step
  echo "--- last lines of $1" >&2
  tail -n "${2:-30}" "$1" | sed 's/^/    /' >&2
}

unmount_under() {  # unmount_under DIR: whatever a killed dockerd or debootstrap left mounted there, deepest first
  local mnt
  awk -v d="$1" '$2 == d || index($2, d "/") == 1 { print $2 }' /proc/mounts | sort -r | while read -r mnt; do
    umount -l "$mnt" || true
  done
}

stop_pid() {  # stop_pid PID SECONDS: TERM, wait, then KILL
  local pid="$1" grace="$2"
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq "$((grace * 5))"); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.2
  done
  kill -KILL "$pid" 2>/dev/null || true
}

summary() {
  local line total=$((SECONDS - started)) status=PASS
  [[ $failed == 0 ]] || status=FAIL
  echo
  echo "critbatch image test: $status"
  echo "  image: $image $image_size (base $base_image $base_size, storage driver ${driver:-none})"
  printf '  phases (s):'
  for line in "${timings[@]}"; do printf ' %s %s;' "${line% *}" "${line##* }"; done
  printf ' total %s\n' "$total"
  for line in "${checks[@]}"; do echo "$line"; done
  echo "RESULT: $status"
}

cleanup() {
  local rc=$?
  if [[ -n "$current" ]]; then
    timings+=("$current $((SECONDS - phase_t0))")
    check "$current" fail "exit code $rc; logs in $logs"
  fi
  [[ $rc == 0 ]] || failed=1
  if [[ -n "$s3_pid" ]]; then
    stop_pid "$s3_pid" 20
    wait "$s3_pid" 2>/dev/null || true
  fi
  [[ -z "$s3_dir" ]] || rm -rf "$s3_dir"
  if [[ -n "$dockerd_pid" ]]; then
    stop_pid "$dockerd_pid" 60
    wait "$dockerd_pid" 2>/dev/null || true
  fi
  unmount_under "$work/docker-exec"
  if [[ "${CRITBATCH_IMAGE_KEEP:-0}" != 1 ]]; then
    unmount_under "$docker_root"
    rm -rf --one-file-system "$docker_root" "$work/docker-exec"
  fi
  summary
  if [[ $failed != 0 ]]; then exit 1; fi
  exit 0
}

# ---- prerequisites -------------------------------------------------------------------------------------

prerequisites() {
  if [[ "$(id -u)" != 0 ]]; then
    echo "needs root: it starts dockerd and runs debootstrap" >&2
    return 1
  fi
  if [[ ! -x "$py" ]] || ! "$py" -c "import critbatch.jobs.local.s3server" 2>/dev/null; then
    echo "no host Python with critbatch at $py (make test creates .venv; or set CRITBATCH_PYTHON)" >&2
    return 1
  fi
  if ! command -v dockerd >/dev/null || ! command -v docker >/dev/null || ! command -v debootstrap >/dev/null; then
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io debootstrap; } \
        >"$logs/apt.log" 2>&1; then
      show_log "$logs/apt.log"
      return 1
    fi
  fi
  local free_gb
  free_gb="$(df --output=avail -BG "$work" | tail -n 1 | tr -dc '0-9')"
  if ((free_gb < min_free_gb)); then
    echo "only ${free_gb} GB free under $work; the build needs about $min_free_gb GB" >&2
    return 1
  fi
}

# ---- dockerd -------------------------------------------------------------------------------------------

# A private dockerd (own data root, exec root and socket) so nothing of the machine's Docker setup is
# touched. No bridge and no iptables: every container and build uses the host's network.
start_dockerd_with() {
  local drv="$1"
  mkdir -p "$docker_root" "$work/docker-exec"
  dockerd --data-root "$docker_root" --exec-root "$work/docker-exec" --pidfile "$work/dockerd.pid" \
    -H "unix://$work/docker.sock" --storage-driver="$drv" --bridge=none --iptables=false \
    >"$logs/dockerd-$drv.log" 2>&1 &
  dockerd_pid=$!
  for _ in $(seq 120); do
    if docker info >/dev/null 2>&1; then
      driver="$drv"
      return 0
    fi
    kill -0 "$dockerd_pid" 2>/dev/null || break
    sleep 0.5
  done
  stop_pid "$dockerd_pid" 10
  wait "$dockerd_pid" 2>/dev/null || true
  dockerd_pid=""
  show_log "$logs/dockerd-$drv.log" 10
  return 1
}

start_dockerd() {
  export DOCKER_HOST="unix://$work/docker.sock"
  if [[ -n "$driver" ]]; then
    start_dockerd_with "$driver"
  else
    # overlay2 stores each layer once; vfs copies the whole tree per layer (many times the image size).
    start_dockerd_with overlay2 || { echo "overlay2 failed; trying vfs" >&2; start_dockerd_with vfs; }
  fi
}

# ---- base image ----------------------------------------------------------------------------------------

make_base() {
  local rootfs="$work/rootfs"
  if [[ ! -x "$rootfs/usr/bin/python3" ]]; then
    unmount_under "$rootfs.partial"
    rm -rf --one-file-system "$rootfs.partial"
    # shellcheck disable=SC2086  # an unset mirror is no argument at all
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
      bookworm "$rootfs.partial" ${CRITBATCH_DEBIAN_MIRROR:-} >"$logs/debootstrap.log" 2>&1 \
      || { show_log "$logs/debootstrap.log"; return 1; }
    mv "$rootfs.partial" "$rootfs"
  else
    echo "debootstrap: cached in $rootfs"
  fi
  # Without this machine's CA bundle pip inside the build fails TLS verification.
  cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
  tar -C "$rootfs" -c . | docker import - "$base_image" >/dev/null
  base_size="$(human "$(docker image inspect -f '{{.Size}}' "$base_image")")"
}

human() { numfmt --to=si --suffix=B --format='%.1f' "$1"; }

# ---- build ---------------------------------------------------------------------------------------------

build_image() {
  DOCKER_BUILDKIT=0 "$repo/images/build.sh" --tag "$image" --base "$base_image" --network host \
    >"$logs/build.log" 2>&1 || { show_log "$logs/build.log" 40; return 1; }
  tail -n 1 "$logs/build.log"
  image_size="$(human "$(docker image inspect -f '{{.Size}}' "$image")")"
}

# ---- S3 server on loopback -----------------------------------------------------------------------------

# SeaweedFS through critbatch's own S3Server (free port pairs, readiness probe); it runs until SIGTERM and
# then stops weed itself, so only this helper's pid is ours to stop.
start_s3() {
  s3_dir="$(mktemp -d "$work/s3.XXXXXX")"
  "$py" -c '
import signal, sys
from critbatch.jobs.local.s3server import S3Server
server = S3Server(sys.argv[1]).start()
def stop(*_):
    server.stop()
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
with open(sys.argv[2], "w") as f:
    f.write(server.endpoint)
signal.pause()
' "$s3_dir/data" "$s3_dir/endpoint" >"$logs/s3.log" 2>&1 &
  s3_pid=$!
  for _ in $(seq 240); do
    if [[ -s "$s3_dir/endpoint" ]]; then
      export AWS_ENDPOINT_URL AWS_ACCESS_KEY_ID=critbatch AWS_SECRET_ACCESS_KEY=critbatch-secret
      export AWS_DEFAULT_REGION=us-east-1
      AWS_ENDPOINT_URL="$(cat "$s3_dir/endpoint")"
      echo "S3 at $AWS_ENDPOINT_URL"
      return 0
    fi
    kill -0 "$s3_pid" 2>/dev/null || break
    sleep 0.5
  done
  show_log "$logs/s3.log"
  return 1
}

# ---- the cell in the container -------------------------------------------------------------------------

# What the cell Job's pod has: uid 1000, read-only root, all capabilities dropped, no privilege escalation,
# writable emptyDirs (here tmpfs) for /tmp, HOME and the caches, /dev/shm, and credentials in the env.
scratch="rw,nosuid,nodev,mode=1777"
pod=(run --rm --network host --user 1000:1000 --read-only --cap-drop ALL
  --security-opt no-new-privileges --shm-size 1g
  --tmpfs "/tmp:$scratch" --tmpfs "/home/critbatch:$scratch" --tmpfs "/var/cache/critbatch:$scratch"
  -e AWS_ENDPOINT_URL -e AWS_ACCESS_KEY_ID -e AWS_SECRET_ACCESS_KEY -e AWS_DEFAULT_REGION
  -e HOME=/home/critbatch -e TMPDIR=/tmp -e MPLCONFIGDIR=/var/cache/critbatch/matplotlib
  -e TORCHINDUCTOR_CACHE_DIR=/var/cache/critbatch/torchinductor -e TRITON_CACHE_DIR=/var/cache/critbatch/triton
  -e OMP_NUM_THREADS=1 -e PYTHONUNBUFFERED=1)

# The pod's command: the launcher with torchrun's options, then critbatch.jobs.cli train.
run_cell() {
  timeout 900 docker "${pod[@]}" --entrypoint python "$image" -m critbatch.jobs.train.launch --standalone \
    --nproc-per-node=1 -m critbatch.jobs.cli train --cell "$cell" --store "$store" --progress lines \
    --flush-steps 20 --device cpu >"$logs/cell.log" 2>&1 || { show_log "$logs/cell.log"; return 1; }
  grep -E "total steps|steps/epoch" "$logs/cell.log" | head -n 2 || true
  check "cell ran in the container (launcher, uid 1000, read-only root)" ok
}

# Every backend's rendered pod in the image, with the pod's own security context (tests/test_pods.py under
# CRITBATCH_POD_IMAGE): a good cell, a bad one, a GPU pod without a GPU, SIGTERM and resume, a store outage.
run_pods() {
  if CRITBATCH_POD_IMAGE="$image" timeout 3600 "$py" -m pytest -q -p no:cacheprovider "$repo/tests/test_pods.py" \
      >"$logs/pods.log" 2>&1; then
    check "pods: every backend's rendered pod in the image" ok "$(tail -n 1 "$logs/pods.log")"
  else
    show_log "$logs/pods.log"
    check "pods: every backend's rendered pod in the image" fail "$(tail -n 1 "$logs/pods.log")"
  fi
}

# From the host, through the store: _SUCCESS says done and every step 1..50 is logged once.
check_store() {
  local out
  out="$("$py" - "$cell" "$store" <<'EOF'
import json, sys
from critbatch.jobs.cell.spec import Cell
from critbatch.jobs.cell.logschema import ipc_to_table
from critbatch.jobs.store import open_store
from critbatch.jobs.cell.layout import cell_prefix, success_key

cell, store = Cell.from_json(sys.argv[1]), open_store(sys.argv[2])
summary = json.loads(store.get_text(success_key(cell.sweep, cell.id)))
prefix = cell_prefix(cell.sweep, cell.id)
parts = store.list(f"{prefix}/steps/")
steps = [r["step"] for key in parts for r in ipc_to_table(store.get_bytes(key)).to_pylist()]
evals = sum(ipc_to_table(store.get_bytes(k)).num_rows for k in store.list(f"{prefix}/evals/"))
print(f"cell_id={cell.id} status={summary['status']} steps={len(steps)} parts={len(parts)} evals={evals} "
      f"ordered={steps == list(range(1, cell.max_steps + 1))}")
EOF
)" || { echo "$out"; check "store holds the cell's logs" fail "could not read them"; return 0; }
  echo "$out"
  if [[ "$out" == *"status=done"* && "$out" == *"steps=50 "* && "$out" == *"ordered=True"* \
        && "$out" != *"parts=0 "* && "$out" != *"evals=0 "* ]]; then
    check "store: _SUCCESS done, steps 1..50 once" ok "$out"
  else
    check "store: _SUCCESS done, steps 1..50 once" fail "$out"
  fi
}

# The image's entrypoint: --help, and the same cell again through `critbatch train`, which finds its
# _SUCCESS in the store and does nothing.
check_entrypoint() {
  local out
  out="$(docker "${pod[@]}" "$image" --help 2>&1)" || true
  if [[ "$out" == *"usage: critbatch"* && "$out" == *"train"* && "$out" == *"analyze"* ]]; then
    check "entrypoint: critbatch --help" ok
  else
    check "entrypoint: critbatch --help" fail "$(head -n 3 <<<"$out")"
  fi
  out="$(docker "${pod[@]}" "$image" --version 2>&1)" || true
  check "entrypoint: critbatch --version" "$([[ "$out" == critbatch* ]] && echo ok || echo fail)" "$out"
  out="$(timeout 300 docker "${pod[@]}" "$image" train --cell "$cell" --store "$store" --progress none 2>&1)" || true
  if [[ "$out" == *"already finished (done)"* ]]; then
    check "entrypoint: train again skips the finished cell" ok
  else
    check "entrypoint: train again skips the finished cell" fail "$(tail -n 3 <<<"$out")"
  fi
}

# ---- main ----------------------------------------------------------------------------------------------

mkdir -p "$work" "$logs"
exec 9>"$work/lock"
if ! flock -n 9; then
  echo "critbatch image test: another run holds $work/lock" >&2
  exit 1
fi
trap cleanup EXIT

phase prerequisites prerequisites
phase dockerd start_dockerd
phase base make_base
phase build build_image
phase s3 start_s3
phase cell run_cell
phase store check_store
phase entrypoint check_entrypoint
phase pods run_pods
