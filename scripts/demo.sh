#!/usr/bin/env bash
# Set up .venv and run the embedded default, `stcompress demo`: the whole pipeline (teacher
# fine-tune -> importance search -> prune -> KD data -> fine-tune + QLoRA heal -> export -> evaluate
# -> report) on the built-in speech-translation task, offline and CPU-only, in a few minutes.
#   scripts/demo.sh [--target-lang zh] [--fresh]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
scripts/setup.sh "$root/.venv" tf5 >/dev/null
.venv/bin/stcompress demo -q "$@"
