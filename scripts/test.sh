#!/usr/bin/env bash
# Set up both environments and run the test suite under transformers 5.x and 4.57.x.
#   scripts/test.sh [pytest args...]
# The two families run at the same time (most tests use one core; the suite takes about as long as
# one family alone would on two cores); each family's output is printed whole when both are done.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
export SACREBLEU="${SACREBLEU:-$(mktemp -d)}"
scripts/setup.sh "$root/.venv" tf5 >/dev/null
scripts/setup.sh "$root/.venv-tf4" tf4 >/dev/null
logs="$(mktemp -d)"

family() {  # family NAME VENV OTHER_VENV [pytest args]: one full run, its output in $logs/NAME.log
  local name="$1" venv="$2" other="$3"
  shift 3
  {
    echo "== transformers $("$venv/bin/python" -c 'import transformers; print(transformers.__version__)')"
    # tests/test_portability.py decodes what one family saved under the other family's interpreter
    STCOMPRESS_OTHER_PYTHON="$other/bin/python" "$venv/bin/python" -m pytest -q "$@"
  } >"$logs/$name.log" 2>&1
}

family tf5 "$root/.venv" "$root/.venv-tf4" "$@" & tf5=$!
family tf4 "$root/.venv-tf4" "$root/.venv" "$@" & tf4=$!
status=0
wait "$tf5" || status=1
wait "$tf4" || status=1
cat "$logs/tf5.log" "$logs/tf4.log"
exit "$status"
