#!/usr/bin/env bash
# Numerical-deviation report (fp32 and bf16, every stage) against transformers' Qwen2.5-VL.
#   bash bench/test_deviation.sh                # tiny config on CPU
#   bash bench/test_deviation.sh --device cuda  # 3B shapes (add --config 7b for 7B)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
"$PY" bench/deviation.py --out bench/results "$@"
