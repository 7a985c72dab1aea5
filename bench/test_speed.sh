#!/usr/bin/env bash
# Speed report: processor, vision tower, feature extraction, generation, the real-time feature step and shared
# prefixes, each against transformers in the same run. Writes bench/results/<device>-<date>.{json,md,png}.
#   bash bench/test_speed.sh                 # CPU: small real-geometry configs (~10 min on 2 cores)
#   bash bench/test_speed.sh --device cuda   # CUDA: 3B and 7B shapes, random weights, bf16
#   bash bench/test_speed.sh --device cuda --model /path/to/Qwen2.5-VL-7B-Instruct
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
COMMAND="bash bench/test_speed.sh $*"
DEVICE=cpu
MODEL=""
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --model) MODEL=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
if [ "$DEVICE" = cpu ]; then CONFIGS="cpu"; else CONFIGS="3b 7b"; fi
MODEL_ARGS=()
[ -n "$MODEL" ] && MODEL_ARGS=(--model "$MODEL")

"$PY" bench/bench_processor.py --device "$DEVICE" --json "$TMP/processor.json"
for c in $CONFIGS; do
  if [ "$c" = cpu ]; then VIT=cpu-small; DEC=tiny; else VIT=$c; DEC=$c; fi
  "$PY" bench/bench_vit.py --device "$DEVICE" --config "$VIT" --scaling --json "$TMP/vit-$c.json"
  "$PY" bench/bench_decoder.py --device "$DEVICE" --config "$DEC" "${MODEL_ARGS[@]}" --json "$TMP/decoder-$c.json"
done
"$PY" bench/bench_cache.py --device "$DEVICE" --json "$TMP/cache.json"
if [ "$DEVICE" = cpu ]; then STEP=cpu-small; else STEP=3b; fi
"$PY" bench/bench_step.py --device "$DEVICE" --config "$STEP" "${MODEL_ARGS[@]}" --json "$TMP/step.json"
# shared prefixes: N images x k questions; on the CPU one torch thread, speedups from process CPU time
PREFIX_ARGS=()
[ "$DEVICE" = cpu ] && PREFIX_ARGS=(--threads 1)
"$PY" bench/bench_prefix.py --device "$DEVICE" "${PREFIX_ARGS[@]}" --json "$TMP/prefix.json"
"$PY" bench/report.py --inputs "$TMP" --out bench/results --device "$DEVICE" --command "$COMMAND"
