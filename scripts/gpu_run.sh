#!/usr/bin/env bash
# Everything that needs the lent GPU, in two calls that each fit one device command (bench, then training).
# Results are written under $OUT (at most 8 files come back); copy them into bench/results/ and models/.
#
#   bash scripts/gpu_run.sh bench   # GPU checks, realscale engine benchmark (ours vs generate()), sampler profile
#   bash scripts/gpu_run.sh train   # trains models/sudoku and models/text side by side, packs them
#
# Needs: `.whl/` with transformers>=5.24 (the image has an older one) and, for `train`, build/corpus.jsonl.gz.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/dg-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH="/tmp/site:$PWD"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"

case "${1:-}" in
  bench)
    timeout 100 python3 scripts/gpu_checks.py "$OUT/gpu_checks.json" 2>&1 | tail -25
    timeout 270 python3 bench/engine.py --realscale --modes graphs+fused --budget-s 255 \
      --out "$OUT/engine_realscale.json" 2>&1 | grep -v "Loading weights"
    timeout 75 python3 bench/engine.py --realscale --ref-concurrency "" --concurrency 32 --modes graphs+exact \
      --profile-batch 32 --budget-s 70 --out "$OUT/engine_realscale_exact.json" 2>&1 | grep -v "Loading weights"
    ;;
  train)
    timeout 290 python3 -m training gpu --out /tmp/dg-models --budget "${BUDGET:-240}" --pack "$OUT" \
      --corpus build/corpus.jsonl.gz
    ;;
  *) echo "usage: $0 bench|train"; exit 2 ;;
esac
ls -la "$OUT"
