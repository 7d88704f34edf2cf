#!/usr/bin/env bash
# Train both dgserve checkpoints (sudoku, text) on one GPU within a wall-clock budget. No network needed.
#
#   training/gpu_train.sh [OUT_DIR=models] [BUDGET_SECONDS=540] [more args for `python -m training gpu`]
#
# The prepared GPU call (issue 17): both models side by side, continued from the committed ones, the text model at
# canvas 256, packed under $OUT (one .tar.gz per model, each < 16 MB, plus summary.{txt,json}):
#   training/gpu_train.sh /tmp/dg-models 420 --init-from models --text-canvas 256 \
#       --corpus build/corpus.jsonl.gz --pack "$OUT"
#
# Sudoku puzzles come from the committed bank (training/data/sudoku_bank.npz): the GPU machine needs neither
# gcc nor qqwing. The text corpus must come with the working tree (build it here first: `python -m training
# corpus`, which writes build/corpus.jsonl.gz, ~2.4 MB; build/ is git-ignored, so carry it). Without it the text
# model trains on the bundled excerpt and the summary says so. Needs torch (CUDA, with triton for torch.compile)
# and transformers >= 5.24. On a CPU, `--device cpu --smoke` runs the same path in seconds (tests do).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-models}"
BUDGET="${2:-540}"
shift $(( $# < 2 ? $# : 2 ))
PY="${PYTHON:-python}"
exec "$PY" -m training gpu --out "$OUT" --budget "$BUDGET" "$@"
