#!/usr/bin/env bash
# Everything that needs the lent GPU, in two calls that each fit one device command (bench, then training).
# Results are written under $OUT (at most 8 files come back); copy them into bench/results/ and models/.
#
#   bash scripts/gpu_run.sh bench   # GPU checks, realscale engine benchmark (ours vs generate()), sampler profile
#   bash scripts/gpu_run.sh train   # trains models/sudoku and models/text side by side, packs them
#   bash scripts/gpu_run.sh moe     # issue 9: grouped_mm vs batched_mm vs eager experts, ours at 1 and 32
#   bash scripts/gpu_run.sh int4    # issue 9: the 24 GB mode (int4 text layers): peak memory, tok/s at 1 and 8
#   bash scripts/gpu_run.sh kernels # issue 9: where the batch-32 step goes, kernel by kernel (torch.profiler)
#   BUDGET=500 bash scripts/gpu_run.sh sudoku   # issue 4: continue models/sudoku for BUDGET seconds, pack it
#
# Needs: `.whl/` with transformers>=5.24 (the image has an older one), torchao>=0.18 for `int4` (the image has
# none; `pip download --no-deps torchao==0.18.0 transformers==5.24.0 -d .whl`) and, for `train`,
# build/corpus.jsonl.gz.
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
  moe)
    timeout 290 python3 bench/engine.py --realscale --experts grouped_mm,batched_mm,eager --ref-concurrency "" \
      --concurrency 1,32 --new-tokens 256 --modes graphs+fused --profile-batch 32 --budget-s 280 \
      --out "$OUT/engine_realscale_experts.json" 2>&1 | grep -v "Loading weights"
    ;;
  kernels)
    timeout 290 python3 bench/engine.py --realscale --ref-concurrency "" --concurrency 32 --new-tokens 256 \
      --modes static+fused --profile-batch 32 --kernels --budget-s 280 \
      --out "$OUT/engine_realscale_kernels.json" 2>&1 | grep -v "Loading weights"
    ;;
  int4)
    timeout 290 python3 bench/engine.py --realscale --quantization int4 --concurrency 1,8 --ref-concurrency 1,8 \
      --new-tokens 512 --modes eager+fused --profile-batch 8 --chunk-rows 4 --budget-s 280 \
      --out "$OUT/engine_realscale_int4.json" 2>&1 | grep -v "Loading weights"
    ;;
  sudoku)
    timeout $(( ${BUDGET:-500} + 60 )) python3 -m training sudoku --out /tmp/dg-models/sudoku --init models/sudoku \
      --max-seconds "${BUDGET:-500}" --device cuda --batch-size 1024 2>&1 | tail -40
    tar czf "$OUT/sudoku.tar.gz" -C /tmp/dg-models sudoku && cp /tmp/dg-models/sudoku/dgserve.json "$OUT/"
    ;;
  train)
    timeout 290 python3 -m training gpu --out /tmp/dg-models --budget "${BUDGET:-240}" --pack "$OUT" \
      --corpus build/corpus.jsonl.gz
    ;;
  *) echo "usage: $0 bench|train|moe|int4|kernels|sudoku"; exit 2 ;;
esac
ls -la "$OUT"
