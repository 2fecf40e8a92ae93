#!/usr/bin/env bash
# Every device call sends the working tree (tracked + untracked-not-ignored files, <= 64 MiB with what
# it carries). The committed testbed results (adapters, hypotheses: ~50 MB) leave little room for the
# pack and data chunks, so a GPU stretch takes them out of what travels, and puts them back after:
#
#   scripts/slim_tree.sh out    # benchmarks/testbed/results -> .slim-aside/results (git-ignored), out of the index
#   scripts/slim_tree.sh in     # back where it was, the index as before (nothing committed either way)
#   scripts/slim_tree.sh status
#
# A stretch that seeds from those results carries them as chunks instead (once, not every call):
#   tar -cf runs/carry/seed-de-run3.tar -C .slim-aside/results/de-run3 . && \
#     python -m stcompress.testbed split-pack runs/carry/seed-de-run3.tar --mib 10 && rm runs/carry/seed-de-run3.tar
# (gpu_run.sh unpacks it to /tmp/tb/seed/de-run3: TB_SEED_de="/tmp/tb/seed/de-run3 all").
set -euo pipefail
cd "$(dirname "$0")/.."
R=benchmarks/testbed/results
A=.slim-aside
case "${1:-status}" in
  out)
    [ ! -e "$A/results" ] || { echo "error: $A/results exists (an earlier 'out'); run '$0 in' first" >&2; exit 2; }
    [ -d "$R" ] || { echo "error: $R is not here; nothing to take out" >&2; exit 2; }
    if ! git diff --quiet -- "$R" || ! git diff --cached --quiet -- "$R" || [ -n "$(git ls-files --others --exclude-standard -- "$R")" ]; then
      echo "error: $R has uncommitted changes; commit them first (out/in restores the committed state only)" >&2; exit 2
    fi
    mkdir -p "$A" && mv "$R" "$A/results" && git rm -r -q --cached -- "$R"
    echo "out: $R -> $A/results (index: untracked until '$0 in'); do not commit now" ;;
  in)
    [ -d "$A/results" ] || { echo "error: nothing aside ($A/results missing)" >&2; exit 2; }
    [ ! -e "$R" ] || { echo "error: $R exists again; move it away, then rerun" >&2; exit 2; }
    mv "$A/results" "$R" && git reset -q -- "$R"
    git diff --quiet -- "$R" && echo "in: $R restored, unchanged" || { echo "in: $R restored, but differs from HEAD:"; git status --short -- "$R" | head; } ;;
  status)
    [ -d "$A/results" ] && echo "out ($A/results)" || echo "in" ;;
  *) echo "usage: $0 out|in|status" >&2; exit 2 ;;
esac
