#!/usr/bin/env bash
# The pipeline benchmark with transcription on CPUs of its own.
#
# On one small machine the ASR server, Kafka, PostgreSQL, ffmpeg and vidpipe
# share the same cores, so every instruction the pipeline spends is taken
# from transcription, and the benchmark measures co-location as much as the
# pipeline. In production the ASR server runs on machines (or a GPU) of its
# own. This runs `cargo bench --bench pipeline` with that split: a second
# ASR server of the stack's model, one single-threaded worker per CPU in
# BENCH_ASR_CPUS (default 0), and everything else (the stack's services,
# the benchmark, vidpipe's stages, ffmpeg, the script) on BENCH_REST_CPUS
# (default: the other CPUs). The ASR-alone run, the script and vidpipe all
# use that server. The services get their own CPU lists back at the end.
#
# Usage: benches/pinned.sh [extra cargo bench arguments]
#   BENCH_ROUNDS, BENCH_ASR_CONCURRENCY: as for the pipeline benchmark.
#   BENCH_PROFILE (default bench-opt), BENCH_ASR_PORT (default 8020).
set -euo pipefail
cd "$(dirname "$0")/.."

STACK=$(realpath -m -- "${VIDPIPE_STACK_DIR:-$PWD/.stack}")
CACHE=${VIDPIPE_CACHE_DIR:-${HOME:-/root}/.cache/vidpipe}
die() { echo "pinned.sh: $*" >&2; exit 2; }
command -v taskset > /dev/null || die "taskset (util-linux) is needed"

# The CPUs this process may use (cpusets included), and a list's CPUs.
ALLOWED=$(taskset -c -p $$ | sed 's/.*: //')
expand() {
  local part out=()
  IFS=, read -ra parts <<< "$1"
  for part in "${parts[@]}"; do
    if [[ $part =~ ^([0-9]+)-([0-9]+)$ ]]; then
      out+=($(seq "${BASH_REMATCH[1]}" "${BASH_REMATCH[2]}"))
    elif [[ $part =~ ^[0-9]+$ ]]; then
      out+=("$part")
    else
      return 1
    fi
  done
  echo "${out[@]}"
}
ALL=($(expand "$ALLOWED")) || die "cannot read this process's CPU list: $ALLOWED"
ASR_CPUS=${BENCH_ASR_CPUS:-${ALL[0]}}
ASR=($(expand "$ASR_CPUS")) || die "BENCH_ASR_CPUS=$ASR_CPUS is not a CPU list (e.g. 0 or 0,2 or 0-1)"
if [[ -z ${BENCH_REST_CPUS:-} ]]; then
  REST=()
  for c in "${ALL[@]}"; do [[ " ${ASR[*]} " == *" $c "* ]] || REST+=("$c"); done
  REST_CPUS=$(IFS=,; echo "${REST[*]}")
else
  REST_CPUS=$BENCH_REST_CPUS
  REST=($(expand "$REST_CPUS")) || die "BENCH_REST_CPUS=$REST_CPUS is not a CPU list"
fi
((${#ALL[@]} >= 2)) || die "needs at least 2 CPUs, this process may use ${#ALL[@]}"
[[ -n $REST_CPUS ]] || die "no CPU is left for the rest once the ASR server has $ASR_CPUS"
for c in "${ASR[@]}"; do
  [[ " ${REST[*]} " != *" $c "* ]] || die "CPU $c is in both BENCH_ASR_CPUS and BENCH_REST_CPUS"
done
PORT=${BENCH_ASR_PORT:-8020}
PROFILE=${BENCH_PROFILE:-bench-opt}

[[ -f $STACK/env && -f $STACK/asr/models.yaml ]] ||
  die "no stack in $STACK: start it first (scripts/stack up)"
SERVER=$CACHE/venv/asr/bin/faster-whisper-server
[[ -x $SERVER ]] || die "no ASR server at $SERVER (scripts/stack up installs it)"
# Worker processes: one per CPU of the ASR's list.
WORKERS=${#ASR[@]}

# The stack's services: each leads a session of its own (scripts/stack
# starts them with setsid), PostgreSQL's postmaster with its backends. A
# pid file whose pid does not lead its own session is stale (the pid was
# given to another process): it is left alone.
services() {
  local f pid sid
  for f in "$STACK"/run/*.pid "$STACK"/postgres/data/postmaster.pid; do
    [[ -f $f ]] || continue
    pid=$(head -n 1 "$f")
    [[ $pid =~ ^[0-9]+$ ]] || continue
    sid=$(ps -o sid= -p "$pid" | tr -d ' ') || continue
    [[ $sid == "$pid" ]] || continue
    pgrep -s "$sid" || true
  done
}
# Each process's CPU list before pinning, to give it back.
declare -A SAVED=()
pin() {
  local pid
  for pid in $(services); do
    [[ -n ${SAVED[$pid]:-} ]] || SAVED[$pid]=$(taskset -c -p "$pid" 2> /dev/null | sed 's/.*: //')
    taskset -a -p -c "$1" "$pid" > /dev/null 2>&1 || true
  done
}
unpin() {
  local pid
  for pid in "${!SAVED[@]}"; do
    [[ -n ${SAVED[$pid]} ]] && taskset -a -p -c "${SAVED[$pid]}" "$pid" > /dev/null 2>&1 || true
  done
}

ASR_PID=
cleanup() {
  [[ -n $ASR_PID ]] && kill -- "-$ASR_PID" 2> /dev/null || true
  unpin
}
trap cleanup EXIT

# Build first, on every CPU.
cargo bench --bench pipeline --profile "$PROFILE" --no-run

pin "$REST_CPUS"
LOG=$(mktemp -t vidpipe-pinned-asr.XXXXXX.log)
echo "pinned.sh: ASR server on CPUs $ASR_CPUS ($WORKERS workers, port $PORT, log $LOG); the rest on CPUs $REST_CPUS"
setsid taskset -c "$ASR_CPUS" env HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 OMP_NUM_THREADS=1 \
  "$SERVER" --config "$STACK/asr/models.yaml" --host 127.0.0.1 --port "$PORT" \
  --workers "$WORKERS" --log-level warning > "$LOG" 2>&1 < /dev/null &
ASR_PID=$!
for _ in $(seq 120); do
  curl -sf -o /dev/null "http://127.0.0.1:$PORT/health" && break
  kill -0 "$ASR_PID" 2> /dev/null || die "the ASR server exited: $(tail -n 5 "$LOG")"
  sleep 1
done
curl -sf -o /dev/null "http://127.0.0.1:$PORT/health" || die "the ASR server did not come up in 120 s"

BENCH_ASR_URL=http://127.0.0.1:$PORT/v1 taskset -c "$REST_CPUS" \
  cargo bench --bench pipeline --profile "$PROFILE" "$@"
