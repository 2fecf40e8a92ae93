#!/usr/bin/env bash
# The testbed on the GPU machine, in calls of <= 10 minutes that each carry <= ~55 MiB.
# Run from the repository root, every call the same command; it does what it can and says what is
# missing. State lives in /tmp/tb (kept while the machine stays warm), so a later call continues:
#
#   bash benchmarks/testbed/gpu_run.sh            # stage carried files; build; run; pack $OUT
#
# What to carry (ignored paths; one or more per call, any order; see benchmarks/testbed/README.md):
#   .whl                                         gguf, soundfile, cffi, pycparser (+ bitsandbytes while the tree is small)
#   runs/carry/bitsandbytes-*.whl.partNN         a large wheel in split-pack chunks (+ its .sha256)
#   runs/carry/testbed-base.gguf.partNN          the pack in chunks (split-pack; + testbed-base.gguf.sha256)
#   runs/carry/testbed-data-de.tar[.partNN]      speech + manifests, English -> German (whole, or split-pack chunks + .sha256)
#   runs/carry/testbed-data-zh.tar               speech + manifests, English -> Chinese
#   runs/carry/seed-NAME.tar[.partNN]            an earlier stretch's results folder (step 4a; + .sha256)
# Env: TB_BUDGET seconds of recipe time this call (default 500), TB_LANGS (default "de zh"),
#   TB_SEED_<lang> (step 4b: finished stages from a committed results folder, merged weights rebuilt),
#   TB_RECIPE=0 (skip step 5, the recipes), TB_FRONTIER_<lang>=DIR (step 5b sweeps the teacher and the
#   healed students rebuilt from the results folder DIR, not a run directory), TB_PRECISIONS and
#   TB_TRIM (step 5b's grid; default bf16,int8,nf4 and false,true).
set -uo pipefail
TB=/tmp/tb
BUDGET=${TB_BUDGET:-500}
LANGS=${TB_LANGS:-de zh}
START=$(date +%s)
mkdir -p "$TB/carry" "$TB/site" runs
OUT=${OUT:-$TB/out}
mkdir -p "$OUT"

# 1. wheels -> /tmp/tb/site (once)
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$TB/site" .whl/*.whl \
    && echo "installed: $(ls .whl)"
fi
export PYTHONPATH="$PWD/src:$TB/site"
export SACREBLEU="$TB/sacrebleu" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# every clip's tower output stays in memory for the whole run (~1.5 GB for 8k short clips)
export STCOMPRESS_TOWER_MEMO_MB=${STCOMPRESS_TOWER_MEMO_MB:-24000}
# ... and on disk for the next call's process (run 3: 106-132 s of tower per call for 13,750 clips)
export STCOMPRESS_TOWER_MEMO_DIR=${STCOMPRESS_TOWER_MEMO_DIR:-$TB/tower-memo}

# 2. stage whatever this call carried (the repo copy may be fresh next call; /tmp/tb is not)
if [ -d runs/carry ]; then
  for f in runs/carry/*; do [ -e "$f" ] && cp -f "$f" "$TB/carry/" && echo "staged $(basename "$f")"; done
fi

# joined FILE: FILE is here whole (carried whole, or its split-pack chunks + FILE.sha256 joined now)
joined() {
  [ -f "$1" ] && return 0
  [ -f "$1.sha256" ] || return 1
  python3 -m stcompress.testbed join-pack "$1" || { echo "$(basename "$1"): not all chunks yet"; return 1; }
}

# 2b. a wheel too large for one call (bitsandbytes, 43 MB, once the tree is over ~24 MB) travels as
#     split-pack chunks (runs/carry/NAME.whl.partNN + NAME.whl.sha256): join, check, install (once)
for sha in "$TB"/carry/*.whl.sha256; do
  [ -e "$sha" ] || continue
  whl="${sha%.sha256}"
  joined "$whl" || continue
  if [ ! -f "$whl.installed" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$TB/site" "$whl" \
      && touch "$whl.installed" && echo "installed $(basename "$whl")"
  fi
done

# 3. the base model: join the pack, build the model (once)
if [ ! -f "$TB/testbed/base/config.json" ]; then
  if joined "$TB/carry/testbed-base.gguf"; then
    mkdir -p "$TB/testbed"
    python3 -m stcompress.testbed build-model --pack "$TB/carry/testbed-base.gguf" --out "$TB/testbed/base" || exit 1
  fi
fi

# 4. the data: unpack each language's tar (once)
for L in $LANGS; do
  if [ ! -f "$TB/data/$L/checks.json" ] && joined "$TB/carry/testbed-data-$L.tar"; then
    mkdir -p "$TB/data" && tar -xf "$TB/carry/testbed-data-$L.tar" -C "$TB/data" && echo "data $L unpacked"
  fi
done

# 4a. carried seeds (when the tree travels without benchmarks/testbed/results: scripts/slim_tree.sh):
#     runs/carry/seed-NAME.tar (whole, or split-pack chunks + .sha256) -> /tmp/tb/seed/NAME (once)
for f in "$TB"/carry/seed-*.tar "$TB"/carry/seed-*.tar.sha256; do
  t="${f%.sha256}"
  n=$(basename "$t" .tar); n=${n#seed-}
  if [ -e "$f" ] && [ ! -d "$TB/seed/$n" ] && joined "$t"; then
    rm -rf "$TB/seed/.$n" && mkdir -p "$TB/seed/.$n" && tar -xf "$t" -C "$TB/seed/.$n" && mv "$TB/seed/.$n" "$TB/seed/$n" \
      && echo "seed $n unpacked"
  fi
done

# the recipes read runs/testbed/base, runs/testbed-data/<lang>/ and write runs/testbed-<lang>/
mkdir -p "$TB/runs"
ln -sfn "$TB/testbed" runs/testbed
ln -sfn "$TB/data" runs/testbed-data
missing=""
[ -f runs/testbed/base/config.json ] || missing="$missing pack(testbed-base.gguf.part00..02 + .sha256)"
python3 -c "import gguf, soundfile" 2>/dev/null || missing="$missing wheels(.whl)"
for L in $LANGS; do [ -f "runs/testbed-data/$L/checks.json" ] || missing="$missing data-$L"; done
for L in $LANGS; do v="TB_SEED_$L"; d=(${!v:-}); [ ${#d[@]} -lt 2 ] || [ -d "${d[0]}" ] || missing="$missing seed-$L(${d[0]})"; done
for L in $LANGS; do v="TB_FRONTIER_$L"; [ -z "${!v:-}" ] || [ -d "${!v}" ] || missing="$missing frontier-$L(${!v})"; done
if [ -n "$missing" ]; then echo "waiting for:$missing"; exit 0; fi

# 4b. seeds: finished stages of an earlier stretch, from its collected artifacts (`python -m
#     stcompress.testbed seed`): each stage's files and manifest as collected, plan.json, and the fp32
#     weights of merged stages rebuilt here from the base + the fp16 adapters; never over what this
#     machine already has. The runner then skips the seeded stages whose manifest and config still
#     match. TB_SEED_<lang>="DIR STAGE...": DIR a committed results folder (it travels with the tree),
#     e.g. TB_SEED_de="benchmarks/testbed/results/de-run3 asr asr-merged asr-dev teacher teacher-merged teacher-eval",
#     or a carried one (step 4a) with every finished stage: TB_SEED_de="/tmp/tb/seed/de-run3 all"
for L in $LANGS; do
  v="TB_SEED_$L"; seed=(${!v:-})
  [ ${#seed[@]} -gt 1 ] || continue
  stages=$(IFS=,; echo "${seed[*]:1}")
  python3 -m stcompress.testbed seed --base runs/testbed/base --artifacts "${seed[0]}" --run-dir "$TB/runs/testbed-$L" \
    --stages "$stages" --device cuda 2>&1 | tail -n 3 || { echo "seed $L failed"; exit 1; }
  cp -n "${seed[0]}/text-bar-$L.json" "$TB/runs/" 2>/dev/null  # the same base build's bar (step 5a)
done

# 5a. the sanity bar (once per language): the base LM translating the transcripts, 5-shot
for L in $LANGS; do
  [ "${TB_RECIPE:-1}" = 0 ] && break
  if [ ! -f "$TB/runs/text-bar-$L.json" ]; then
    python3 benchmarks/testbed/text_bar.py --model runs/testbed/base --data "runs/testbed-data/$L" --shots 5 \
      --batch-size 150 --out "$TB/runs/text-bar-$L.json" 2>&1 | tail -n 1
  fi
  cp -f "$TB/runs/text-bar-$L.json" "$OUT/" 2>/dev/null
done

# 5. the recipes, resumable: finished stages are skipped; a stage cut by the budget restarts next call
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader 2>/dev/null
for L in $LANGS; do
  [ "${TB_RECIPE:-1}" = 0 ] && break
  ln -sfn "$TB/runs/testbed-$L" "runs/testbed-$L"; mkdir -p "$TB/runs/testbed-$L"
  left=$(( BUDGET - ($(date +%s) - START) ))
  [ "$left" -gt 30 ] || { echo "budget used up before $L; call again"; break; }
  echo "== $L: stcompress run recipes/testbed-$L.yaml (${left}s left)"
  echo "== call at $(date -u +%FT%TZ), ${left}s" >> "$TB/runs/testbed-$L.log"   # every call's log kept, in order
  timeout --signal=INT --kill-after=20 "$left" python3 -m stcompress run "recipes/testbed-$L.yaml" \
    >> "$TB/runs/testbed-$L.log" 2>&1
  rc=$?
  tail -n 25 "$TB/runs/testbed-$L.log"
  echo "== $L: exit $rc ($( [ $rc = 0 ] && echo complete || echo 'not finished: call again'))"
done

# 5b. the quality-vs-bytes frontier (issue 12): the teacher and the healed students x bf16 / int8 / nf4
#     x trimmed or full vocabulary, each on dev and test (`stcompress sweep --inputs`; resumable)
#     TB_FRONTIER_<lang>=DIR: the three models rebuilt from a results folder (`testbed rebuild`, once),
#     every trimmed candidate keeping the tokens of the training references (one vocabulary for all)
for L in $LANGS; do
  d="$TB/runs/testbed-$L"
  inputs="teacher=$d/teacher-merged,h25=$d/export25,h50=$d/export50"
  vocab=()
  v="TB_FRONTIER_$L"
  if [ -n "${!v:-}" ]; then
    d="$TB/frontier-$L"
    mkdir -p "$d"
    for pair in teacher:teacher h25:final25 h50:final50; do
      [ -f "$d/${pair%%:*}/config.json" ] || python3 -m stcompress.testbed rebuild --base runs/testbed/base \
        --artifacts "${!v}" --system "${pair#*:}" --out "$d/${pair%%:*}" --device cuda 2>&1 | tail -n 1
    done
    inputs="teacher=$d/teacher,h25=$d/h25,h50=$d/h50"
    vocab=(--vocab.references "runs/testbed-data/$L/train.jsonl")
    d="$d/h50"
  fi
  [ -f "$d/export50/manifest.json" ] || [ -f "$d/config.json" ] || continue
  left=$(( BUDGET - ($(date +%s) - START) ))
  [ "$left" -gt 60 ] || { echo "budget used up before the $L sweep; call again"; break; }
  echo "== $L: sweep (${left}s left)"
  timeout --signal=INT --kill-after=20 "$left" python3 -m stcompress sweep \
    --inputs "$inputs" --precisions "${TB_PRECISIONS:-bf16,int8,nf4}" --trim "${TB_TRIM:-false,true}" "${vocab[@]}" \
    --dev.dataset "runs/testbed-data/$L/dev.jsonl" --test.dataset "runs/testbed-data/$L/test.jsonl" \
    --dev.subset all --test.subset all --dev.target-lang "$L" --test.target-lang "$L" \
    --generation.max-new-tokens 96 --generation.batch-size 150 --run-dir "$TB/runs/testbed-$L-sweep" \
    >> "$TB/runs/testbed-$L-sweep.log" 2>&1
  echo "== $L sweep: exit $? ($(tail -n 1 "$TB/runs/testbed-$L-sweep.log"))"
done

# 6. what the run must keep -> $OUT (<= 3 files of <= 16 MB each, collect_artifacts.py): every stage's
#    small files (scores, hypotheses, manifests, removal orders, report), the LoRA adapters in fp16
#    (with the projector weights they train), the log; never model weights or audio
for L in $LANGS; do
  d="$TB/runs/testbed-$L"
  [ -d "$d" ] && [ "${TB_RECIPE:-1}" != 0 ] && \
    python3 benchmarks/testbed/collect_artifacts.py "$d" --out "$OUT" --name "testbed-$L" --extra "$TB/runs/testbed-$L.log"
  s="$TB/runs/testbed-$L-sweep"
  [ -d "$s" ] && python3 benchmarks/testbed/collect_artifacts.py "$s" --out "$OUT" --name "testbed-$L-sweep" \
    --extra "$TB/runs/testbed-$L-sweep.log"
done
ls -la "$OUT"
echo "elapsed $(( $(date +%s) - START ))s"
