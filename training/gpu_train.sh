#!/usr/bin/env bash
# Train both dgserve checkpoints (sudoku, text) on one GPU within a wall-clock budget. No network needed.
#
#   training/gpu_train.sh [OUT_DIR=models] [BUDGET_SECONDS=240] [more args for `python -m training gpu`]
#
# e.g. on the device machine, with the results packed under $OUT (one .tar.gz per model, < 16 MB each):
#   training/gpu_train.sh models 230 --pack "$OUT" --corpus build/corpus.jsonl.gz
#
# The text corpus must come with the working tree (build it here first: `python -m training corpus`, which
# writes build/corpus.jsonl.gz, ~2.3 MB; build/ is git-ignored, so carry it). Without it the text model trains on
# the bundled excerpt and the summary says so. Needs torch (CUDA) and transformers >= 5.24 installed.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-models}"
BUDGET="${2:-240}"
shift $(( $# < 2 ? $# : 2 ))
PY="${PYTHON:-python}"
exec "$PY" -m training gpu --out "$OUT" --budget "$BUDGET" "$@"
