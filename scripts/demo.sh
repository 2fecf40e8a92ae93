#!/usr/bin/env bash
# Set up .venv and run the main job on the built-in example: translate, then evaluate.
# Offline and CPU-only. The model is `builtin:tiny-random`, a tiny Qwen2-Audio with RANDOM
# weights built on the spot (real Qwen tokenizer, real Whisper feature extractor): it exercises
# the whole path and measures it, but its translations are noise and its scores near zero.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
scripts/setup.sh "$root/.venv" tf5 >/dev/null
out="${1:-runs/demo}"
.venv/bin/stcompress translate --model.path builtin:tiny-random --data.dataset builtin \
  --generation.max-new-tokens 32 --output "$out/translate"
.venv/bin/stcompress evaluate --hypotheses "$out/translate" --output "$out/evaluate"
