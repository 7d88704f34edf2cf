#!/usr/bin/env bash
# Everything that needs the lent GPU, one mode per device call (each fits the 10-minute command limit). Results go
# under $OUT, tagged with the card (e.g. gpu_checks_h200.json); copy them into bench/results/ and commit them.
#
#   bash scripts/gpu_run.sh check    # ~4 min: the Triton kernels' tests compiled on the device (TRITON_INTERPRET=0),
#                                    #   Triton vs plain-torch forward at the real shapes, graphs vs eager tokens
#   bash scripts/gpu_run.sh bench    # ~9 min: 26B-A4B ours (graphs + fused) at 1, 4, 16, 32, 64 vs generate() at
#                                    #   1, 4, 16, 32 (1024 in / 1024 out, 16 steps), start-up seconds, step profile
#   bash scripts/gpu_run.sh kernels  # ~5 min: the batch-32 and batch-1 steps kernel by kernel (torch.profiler)
#   bash scripts/gpu_run.sh int4     # ~5 min: the 24 GB mode, peak memory and tok/s at 1 and 8
#   bash scripts/gpu_run.sh fp8      # ~5 min: block-scaled e4m3 experts and projections, tok/s at 1 and 32
#   bash scripts/gpu_run.sh train    # <= 10 min: the sudoku training step's examples/s alone, then both embedded
#                                    #   checkpoints trained side by side from their current weights (issue 17);
#                                    #   needs build/corpus.jsonl.gz carried (`python -m training corpus`)
#
# Needs `.whl/` carried (the image has transformers 5.17; DiffusionGemma needs 5.24): `pip download --no-deps
# transformers==5.24.0 torchao==0.18.0 -d .whl`. Try it first with a short timeout: `check` fails fast.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/dg-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
fi
export PYTHONPATH="/tmp/site:$PWD"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
CARD=$(python3 -c "import torch; print(torch.cuda.get_device_name().split()[-1].lower())" 2>/dev/null || echo gpu)
quiet() { grep -v -e "Loading weights" -e "^Failed to load .*torchao" -e "_pytree.py"; }

case "${1:-}" in
  check)
    TRITON_INTERPRET=0 timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_triton_norms.py \
      tests/test_triton_attention.py tests/test_triton_moe.py tests/test_fp8.py tests/test_fused.py 2>&1 \
      | tail -25 | tee "$OUT/triton_tests_$CARD.txt"
    timeout 120 python3 bench/kernels.py --out "$OUT/kernels_$CARD.json" 2>&1 | quiet | tail -40
    timeout 240 python3 scripts/gpu_checks.py "$OUT/gpu_checks_$CARD.json" 2>&1 | quiet | tail -30
    ;;
  bench)
    timeout 560 python3 bench/engine.py --realscale --modes graphs+fused --concurrency 1,4,16,32,64 \
      --ref-concurrency 1,4,16,32 --profile-batch 32 --budget-s 540 --out "$OUT/engine_realscale_$CARD.json" 2>&1 | quiet
    ;;
  kernels)
    timeout 290 python3 bench/engine.py --realscale --ref-concurrency "" --concurrency 1,32 --new-tokens 256 \
      --modes static+fused --profile-batch 32 --kernels --budget-s 280 \
      --out "$OUT/engine_realscale_kernels_$CARD.json" 2>&1 | quiet
    ;;
  int4)
    timeout 290 python3 bench/engine.py --realscale --quantization int4 --concurrency 1,8 --ref-concurrency 1,8 \
      --new-tokens 512 --modes eager+fused --profile-batch 8 --chunk-rows 4 --budget-s 280 \
      --out "$OUT/engine_realscale_int4_$CARD.json" 2>&1 | quiet
    ;;
  fp8)
    timeout 290 python3 bench/engine.py --realscale --quantization fp8 --concurrency 1,32 --ref-concurrency "" \
      --new-tokens 512 --modes graphs+fused --profile-batch 32 --budget-s 280 \
      --out "$OUT/engine_realscale_fp8_$CARD.json" 2>&1 | quiet
    ;;
  train)  # the sudoku step alone first (the only single-model figure; warms the compile cache), then both side by side
    timeout 120 python3 -m training throughput --task sudoku --device cuda --steps 30 --warmup 3 \
      --out "$OUT/training_throughput_$CARD.json"
    PYTHON=python3 timeout 470 training/gpu_train.sh /tmp/dg-models "${BUDGET:-420}" --init-from models \
      --text-canvas 256 --corpus build/corpus.jsonl.gz --pack "$OUT"
    ;;
  *) echo "usage: $0 check|bench|kernels|int4|fp8|train"; exit 2 ;;
esac
ls -la "$OUT"
