#!/usr/bin/env bash
# Everything that needs a GPU, for a CUDA machine without network access (torch, transformers, triton present).
#   bash bench/run_gpu.sh tests       # CUDA tests + kernel tests, prints the bf16 numbers (-s)
#   bash bench/run_gpu.sh deviation   # deviation report, 3B shapes, bf16 and fp32
#   bash bench/run_gpu.sh speed       # speed report, 3B and 7B shapes, bf16
# Results land in bench/results/ and, when $OUT is set, are copied there too.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
"$PY" -c "import qwen_batched.kernels" 2>/dev/null || \
  "$PY" -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())"
case "${1:-all}" in
  tests) "$PY" -m pytest -q -s tests/test_gpu_vision.py tests/test_gpu_decoder.py tests/test_gpu_processor.py tests/test_step.py \
           tests/test_kernels.py tests/test_processor.py ;;
  deviation) PY="$PY" bash bench/test_deviation.sh --device cuda --config 3b ;;
  speed) PY="$PY" bash bench/test_speed.sh --device cuda ;;
  all) "$0" tests; "$0" deviation; "$0" speed ;;
  *) echo "usage: $0 [tests|deviation|speed|all]" >&2; exit 2 ;;
esac
if [ -n "${OUT:-}" ]; then mkdir -p "$OUT/results" && cp -r bench/results/. "$OUT/results/"; fi
