#!/usr/bin/env bash
# Set up .venv and run the main job on the embedded default: the whole pipeline
# (teacher fine-tune -> importance search -> prune -> KD data -> fine-tune + LoRA heal -> export
# -> evaluate -> report) on the built-in example, offline and CPU-only, in a few minutes.
# The model is `builtin:tiny-random`, a tiny Qwen2-Audio with RANDOM weights built on the spot
# (real Qwen tokenizer, real Whisper feature extractor): every stage runs and is measured, but
# the translations are noise and the scores near zero. See README.md for the real model.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
scripts/setup.sh "$root/.venv" tf5 >/dev/null
.venv/bin/stcompress run recipes/demo.yaml -q
echo
sed -n '/^## English/,/^4 segments/p' runs/demo-recipe/report/report.md
echo
echo "report: runs/demo-recipe/report/report.html (and report.md)"
