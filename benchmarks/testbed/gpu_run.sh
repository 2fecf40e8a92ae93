#!/usr/bin/env bash
# The testbed on the GPU machine, in calls of <= 10 minutes that each carry <= ~55 MiB.
# Run from the repository root, every call the same command; it does what it can and says what is
# missing. State lives in /tmp/tb (kept while the machine stays warm), so a later call continues:
#
#   bash benchmarks/testbed/gpu_run.sh            # stage carried files; build; run; pack $OUT
#
# What to carry (ignored paths; one or more per call, any order; see benchmarks/testbed/README.md):
#   .whl                                         gguf, soundfile, cffi, pycparser, bitsandbytes wheels
#   runs/carry/testbed-base.gguf.partNN          the pack in chunks (split-pack; + testbed-base.gguf.sha256)
#   runs/carry/testbed-data-de.tar[.partNN]      speech + manifests, English -> German (whole, or split-pack chunks + .sha256)
#   runs/carry/testbed-data-zh.tar               speech + manifests, English -> Chinese
# Env: TB_BUDGET seconds of recipe time this call (default 500), TB_LANGS (default "de zh").
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

# 2. stage whatever this call carried (the repo copy may be fresh next call; /tmp/tb is not)
if [ -d runs/carry ]; then
  for f in runs/carry/*; do [ -e "$f" ] && cp -f "$f" "$TB/carry/" && echo "staged $(basename "$f")"; done
fi

# 3. the base model: join the pack, build the model (once)
if [ ! -f "$TB/testbed/base/config.json" ]; then
  if [ -f "$TB/carry/testbed-base.gguf.sha256" ] && [ ! -f "$TB/carry/testbed-base.gguf" ]; then
    python3 -m stcompress.testbed join-pack "$TB/carry/testbed-base.gguf" || echo "pack: not all chunks yet"
  fi
  if [ -f "$TB/carry/testbed-base.gguf" ]; then
    mkdir -p "$TB/testbed"
    python3 -m stcompress.testbed build-model --pack "$TB/carry/testbed-base.gguf" --out "$TB/testbed/base" || exit 1
  fi
fi

# 4. the data: unpack each language's tar (once)
for L in $LANGS; do
  if [ -f "$TB/carry/testbed-data-$L.tar.sha256" ] && [ ! -f "$TB/carry/testbed-data-$L.tar" ]; then
    python3 -m stcompress.testbed join-pack "$TB/carry/testbed-data-$L.tar" || echo "data $L: not all chunks yet"
  fi
  if [ ! -f "$TB/data/$L/checks.json" ] && [ -f "$TB/carry/testbed-data-$L.tar" ]; then
    mkdir -p "$TB/data" && tar -xf "$TB/carry/testbed-data-$L.tar" -C "$TB/data" && echo "data $L unpacked"
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
if [ -n "$missing" ]; then echo "waiting for:$missing"; exit 0; fi

# 5a. the sanity bar (once per language): the base LM translating the transcripts, 5-shot
for L in $LANGS; do
  if [ ! -f "$TB/runs/text-bar-$L.json" ]; then
    python3 benchmarks/testbed/text_bar.py --model runs/testbed/base --data "runs/testbed-data/$L" --shots 5 \
      --batch-size 150 --out "$TB/runs/text-bar-$L.json" 2>&1 | tail -n 1
  fi
  cp -f "$TB/runs/text-bar-$L.json" "$OUT/" 2>/dev/null
done

# 5. the recipes, resumable: finished stages are skipped; a stage cut by the budget restarts next call
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader 2>/dev/null
for L in $LANGS; do
  ln -sfn "$TB/runs/testbed-$L" "runs/testbed-$L"; mkdir -p "$TB/runs/testbed-$L"
  left=$(( BUDGET - ($(date +%s) - START) ))
  [ "$left" -gt 30 ] || { echo "budget used up before $L; call again"; break; }
  echo "== $L: stcompress run recipes/testbed-$L.yaml (${left}s left)"
  timeout --signal=INT --kill-after=20 "$left" python3 -m stcompress run "recipes/testbed-$L.yaml" \
    > "$TB/runs/testbed-$L.log" 2>&1
  rc=$?
  tail -n 25 "$TB/runs/testbed-$L.log"
  echo "== $L: exit $rc ($( [ $rc = 0 ] && echo complete || echo 'not finished: call again'))"
done

# 6. small artifacts -> $OUT (<= 8 files, <= 16 MiB each): scores, hypotheses, manifests, removal
#    orders, plots, report, logs; the teacher's projector; LoRA adapters when small enough
for L in $LANGS; do
  d="$TB/runs/testbed-$L"
  [ -d "$d" ] || continue
  (cd "$d" && find . -maxdepth 3 \( -name '*.json' -o -name '*.jsonl' -o -name '*.tsv' -o -name '*.txt' -o -name '*.md' \
      -o -name '*.html' -o -name '*.png' -o -name '*.svg' -o -name '*.yaml' \) -size -4M \
      -not -path './*/model/*' -not -path '*checkpoints*' -print0 | tar --null -czf "$OUT/testbed-$L-results.tar.gz" -T - )
  cp -f "$TB/runs/testbed-$L.log" "$OUT/testbed-$L.log" 2>/dev/null
  if [ -d "$d/align/model" ]; then
    python3 - "$d/align/model" "$OUT/testbed-$L-projector.safetensors" <<'EOF'
import sys
from safetensors import safe_open
from safetensors.torch import save_file
from pathlib import Path
src, out = Path(sys.argv[1]), sys.argv[2]
tensors = {}
for f in sorted(src.glob("*.safetensors")):
    with safe_open(str(f), "pt") as h:
        tensors |= {k: h.get_tensor(k) for k in h.keys() if "multi_modal_projector" in k}
save_file(tensors, out)
print("projector:", {k: tuple(v.shape) for k, v in tensors.items()})
EOF
  fi
  # LoRA adapters of the teacher and the healed models, cast to fp16 (what the repo keeps)
  python3 - "$d" "$OUT/testbed-$L-adapters.tar" <<'EOF'
import io, json, sys, tarfile
from pathlib import Path
import torch
from safetensors.torch import load_file, save
run, out = Path(sys.argv[1]), Path(sys.argv[2])
with tarfile.open(out, "w") as tar:
    for name in ("teacher", "heal25", "heal50", "mid25-heal", "mid50-heal", "nokd50", "lora50"):
        a = run / name / "adapter"
        if not (a / "adapter_model.safetensors").is_file():
            continue
        w = {k: v.half() if v.is_floating_point() else v for k, v in load_file(str(a / "adapter_model.safetensors")).items()}
        files = (("adapter_model.safetensors", save(w)), ("adapter_config.json", (a / "adapter_config.json").read_bytes()))
        if tar.fileobj.tell() + sum(len(d) + 1024 for _, d in files) > 16_000_000:
            print("adapters: no room left under 16 MB for", name); continue
        for fname, data in files:
            info = tarfile.TarInfo(f"{name}/adapter/{fname}"); info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
print("adapters:", out.stat().st_size, "bytes")
EOF
done
ls -la "$OUT"
echo "elapsed $(( $(date +%s) - START ))s"
