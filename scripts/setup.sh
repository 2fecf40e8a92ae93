#!/usr/bin/env bash
# Create (or update) a virtual environment with stcompress and its pinned dependencies.
#   scripts/setup.sh [VENV_DIR] [tf5|tf4]
# tf5 (default): transformers 5.x, the main environment; tf4: transformers 4.57.x, for the
# compatibility test run. CPU machines get torch's local CPU build (torch==2.13.0).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-$root/.venv}"
family="${2:-tf5}"
python="${PYTHON:-python3}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q)
"${pip[@]}" "torch==2.13.0"
"${pip[@]}" -c "$root/constraints/$family.txt" -e "$root[dev,quant,demo]"
echo "ready: $venv ($family)"
