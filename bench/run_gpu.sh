#!/usr/bin/env bash
# Everything that needs a GPU, for a CUDA machine without network access (torch, transformers, triton present).
#   bash bench/run_gpu.sh quick       # ~6 min on an H100/H200: CUDA tests, the headline speed rows, a profile (3B)
#   bash bench/run_gpu.sh tests       # CUDA tests + kernel tests, prints the bf16 numbers (-s)
#   bash bench/run_gpu.sh deviation   # deviation report, 3B shapes, bf16 and fp32
#   bash bench/run_gpu.sh speed       # full speed report, 3B and 7B shapes, bf16
#   bash bench/run_gpu.sh latency     # ~6 min: shared prefixes, compiled step (3B shapes)
#   bash bench/run_gpu.sh quick --device cpu   # dry run of quick's control flow on a CPU, tiny shapes
# Results land in bench/results/ and, when $OUT is set, are copied there too.
#
# quick, sized by arithmetic for the 3B shapes in bf16 (H100 ~ 0.99 PFLOP/s dense, 3.3 TB/s; H200 4.8 TB/s):
#   tests     tiny models, ~130 Triton kernel tests JIT-compiled natively (63 s before the  limit 260 s
#             rope, SwiGLU and add-norm kernels)
#   vit       64 x 448x448 = 65k patches x 32 blocks x ~2*0.67 GFLOP/patch ~ 88 TFLOP... per pass ~0.1-0.3 s;
#             ours vs transformers' sdpa path, 1 warm-up + 5 interleaved reps each               limit 120 s
#   features  B=8 x 4 cameras 224x224 (+ 32 text): 8 x 4 x 64 + 32 = 2.3k tokens x 3B x 2 FLOP ~ 14 TFLOP/pass;
#             tiny; the model build (3B random init on the GPU, ~7 GB) dominates              limit 150 s
#   generate  B=32 x 64 new tokens: 64 decode steps reading 7 GB of weights ~ 64 x 2-3 ms + prefill of 32 x 270
#             tokens; ours (decode step in a CUDA graph), ours with an eager decode step, transformers'
#             generate; 6 runs each (1.69 s / 2.65 s for eager / transformers on the H200)           limit 180 s
#   step      the real-time feature step: eager, in a CUDA graph, extract_features, transformers  limit 90 s
#   profile   kernels per call and device time per kernel class: the step (B=1, 3 x 224x224) eager and its graph
#             replay, the vision tower on 16 x 448x448 (its aligned MLP against the config's width) limit 100 s
#
# latency, for the real-time step after quick (fits the rest of a 15-minute device budget):
#   prefix    16 images x k = 1, 5 questions, sharing on / off / transformers per sample    limit 100 s
#   compiled  bench_step case (a), B=1: eager / graph / compiled (inductor, captured) / extract_features /
#             transformers; the cold compilation of 68 layers dominates                        limit 300 s
# Each part runs under its own `timeout`, so one hang cannot eat the rest; every part's exit code and seconds go
# into the report, which is rewritten (and copied to $OUT) after every part: a run stopped from outside keeps
# what finished. Worst case: quick 900 s, latency 400 s if every part hits its limit; expected quick ~6 min.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
MODE=${1:-all}
shift || true
DEVICE=cuda
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
if ! "$PY" -c "import qwen_batched.kernels" 2>/dev/null; then
  # not installed (an offline machine cannot build an editable install): import the source tree, with kernels/
  # reachable as qwen_batched.kernels through an ignored link
  [ -e qwen_batched/kernels ] || ln -s ../kernels qwen_batched/kernels
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export QWEN_BATCHED_COMMIT=${QWEN_BATCHED_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
if [ "$DEVICE" = cuda ]; then
  "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())" || exit 1
  export TRITON_INTERPRET=0
else
  export TRITON_INTERPRET=1
fi

TMP=$(mktemp -d)
: > "$TMP/parts.tsv"
REPORT_PREFIX="" REPORT_CMD=""  # set by a mode that writes a report
part() {  # part NAME LIMIT_S COMMAND...: run under its own time limit, record the exit code and seconds, then
  # rewrite the report and copy it out, so that a run stopped from outside still returns every finished part
  local name=$1 limit=$2 start rc; shift 2
  echo "=== $name (limit ${limit}s): $*" >&2
  start=$(date +%s)
  timeout --kill-after=10 "$limit" "$@"
  rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - start ))" >> "$TMP/parts.tsv"
  if [ -n "$REPORT_PREFIX" ]; then report > "$TMP/report.log" 2>&1; copy_out; fi
}
copy_out() {  # only what this run wrote (the device tool brings back a few files)
  if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT/results" && find bench/results -type f -newer /tmp/run_gpu.start -exec cp {} "$OUT/results/" \;
  fi
}
report() {  # the parts table + every part's JSON -> bench/results/<REPORT_PREFIX><device>-<date>.*
  "$PY" - "$TMP" <<'PYEOF'
import csv, json, os, sys
sys.path.insert(0, os.getcwd())
from bench.common import header
import torch
tmp = sys.argv[1]
rows = [{"part": n, "exit_code": int(rc), "seconds": int(s)} for n, rc, s in csv.reader(open(f"{tmp}/parts.tsv"), delimiter="\t")]
dev = torch.device("cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") == "0" else "cpu")
json.dump({"meta": header(dev), "rows": rows}, open(f"{tmp}/parts.json", "w"), indent=2)
PYEOF
  "$PY" bench/report.py --inputs "$TMP" --out bench/results --device "$DEVICE" --prefix "$REPORT_PREFIX" \
    --command "$REPORT_CMD"
  cat "$TMP/parts.tsv"
  ! awk -F'\t' '$2 != 0 {bad=1} END {exit !bad}' "$TMP/parts.tsv"
}

quick() {
  local cfg vitcfg vitcase
  REPORT_PREFIX=quick- REPORT_CMD="bash bench/run_gpu.sh quick --device $DEVICE"
  if [ "$DEVICE" = cuda ]; then cfg=3b; vitcfg=3b; vitcase="64 x 448x448"; else cfg=tiny; vitcfg=cpu-small; vitcase="8 x 448x448"; fi
  if [ "$DEVICE" = cuda ]; then
    part tests 260 "$PY" -m pytest -q -rfE -s -p no:cacheprovider tests/test_gpu_vision.py tests/test_gpu_decoder.py \
      tests/test_gpu_processor.py tests/test_kernels.py tests/test_kernels_fused.py tests/test_kernels_rope.py \
      tests/test_kernels_mlp.py tests/test_packed_paths.py tests/test_gpu_step.py
  else
    part tests 200 "$PY" -m pytest -q -x tests/test_kernels_fused.py -k "argument_error or falls_back"
  fi
  part vit 120 "$PY" bench/bench_vit.py --device "$DEVICE" --config "$vitcfg" --case "$vitcase" --no-per-image \
    --reps 5 --json "$TMP/vit-$cfg.json"
  part features 150 "$PY" bench/bench_decoder.py --device "$DEVICE" --config "$cfg" --only features --skip-per-sample \
    --json "$TMP/decoder-features-$cfg.json"
  part generate 180 "$PY" bench/bench_decoder.py --device "$DEVICE" --config "$cfg" --only generation --skip-per-sample \
    --json "$TMP/decoder-generation-$cfg.json"
  part step 90 "$PY" bench/bench_step.py --device "$DEVICE" --config "$cfg" --quick --json "$TMP/step-$cfg.json"
  part profile 100 "$PY" bench/profile_gpu.py --device "$DEVICE" --config "$vitcfg" --steps 3 \
    --json "$TMP/profile-$cfg.json"
  report
}

latency() {
  local cfg=3b stepcfg=3b images=16
  REPORT_PREFIX=latency- REPORT_CMD="bash bench/run_gpu.sh latency --device $DEVICE"
  if [ "$DEVICE" != cuda ]; then cfg=cpu-small; stepcfg=cpu-small; images=2; fi
  part prefix 100 "$PY" bench/bench_prefix.py --device "$DEVICE" --config "$cfg" --images "$images" --k 1,5 --reps 3 \
    --json "$TMP/prefix-$cfg.json"
  # last: a cold inductor compilation of 68 layers may take minutes; what came before is kept if it runs out
  part compiled 300 "$PY" bench/bench_step.py --device "$DEVICE" --config "$stepcfg" --cases a --batches 1 \
    --json "$TMP/step-$cfg.json"
  report
}

rc=0
touch /tmp/run_gpu.start
case "$MODE" in
  quick) quick || rc=$? ;;
  latency) latency || rc=$? ;;
  tests) "$PY" -m pytest -q -s tests/test_gpu_vision.py tests/test_gpu_decoder.py tests/test_gpu_processor.py \
           tests/test_gpu_step.py tests/test_gpu_prefix.py tests/test_kernels.py tests/test_kernels_fused.py \
           tests/test_kernels_rope.py tests/test_kernels_mlp.py tests/test_processor.py || rc=$? ;;
  deviation) PY="$PY" bash bench/test_deviation.sh --device cuda --config 3b || rc=$? ;;
  speed) PY="$PY" bash bench/test_speed.sh --device cuda || rc=$? ;;
  all) "$0" tests || rc=$?; "$0" deviation || rc=$?; "$0" speed || rc=$? ;;
  *) echo "usage: $0 [quick|latency|tests|deviation|speed|all] [--device cuda|cpu]" >&2; exit 2 ;;
esac
copy_out
exit $rc
