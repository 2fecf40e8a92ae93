#!/usr/bin/env bash
# Set up both environments and run the test suite under transformers 5.x and 4.57.x.
#   scripts/test.sh [pytest args...]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
export SACREBLEU="${SACREBLEU:-$(mktemp -d)}"
scripts/setup.sh "$root/.venv" tf5 >/dev/null
scripts/setup.sh "$root/.venv-tf4" tf4 >/dev/null
echo "== transformers $(.venv/bin/python -c 'import transformers; print(transformers.__version__)')"
# tests/test_portability.py decodes what one family saved under the other family's interpreter
STCOMPRESS_OTHER_PYTHON="$root/.venv-tf4/bin/python" .venv/bin/python -m pytest -q "$@"
echo "== transformers $(.venv-tf4/bin/python -c 'import transformers; print(transformers.__version__)')"
STCOMPRESS_OTHER_PYTHON="$root/.venv/bin/python" .venv-tf4/bin/python -m pytest -q "$@"
