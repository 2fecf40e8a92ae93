"""Full fine-tuning of the real 7B architecture (random weights) on one GPU: peak memory and speed of
the one-80-GB preset against plain fp32-weight AdamW, each beside stcompress's estimate, then save +
reload check of the preset's result (consolidated safetensors, plain from_pretrained).

    python benchmarks/teacher_memory.py                 # one H200: ~5-8 minutes, writes $OUT/teacher_memory.json
    python benchmarks/teacher_memory.py --arch tiny --device cpu --steps 2   # the same code path on CPU

Each run takes `--steps` optimizer steps through stcompress's own Trainer.train_step (TranslationLM
forward, the configured loss and optimizer) at batch 4 with 30 s clips. An out-of-memory run is
recorded as such (its peak before the failure included). The JSON is rewritten after every phase,
so a run stopped by a time limit still leaves what it measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import qwen2audio_7b  # noqa: E402

from stcompress.config import FinetuneConfig, load_config  # noqa: E402
from stcompress.data.example import Example  # noqa: E402
from stcompress.data.training import TrainItem  # noqa: E402
from stcompress.model import arch  # noqa: E402
from stcompress.prompt import PromptBuilder  # noqa: E402
from stcompress.training import memory  # noqa: E402
from stcompress.training.collate import Collator, encode_items  # noqa: E402
from stcompress.training.forward import TranslationLM  # noqa: E402
from stcompress.training.lora import setup_full  # noqa: E402
from stcompress.training.loop import TrainData, Trainer  # noqa: E402

TARGET = ("Die Ergebnisse zeigen, dass das vorgeschlagene Verfahren die Übersetzungsqualität deutlich verbessert, "
          "während die Rechenkosten im Vergleich zu den bisherigen Ansätzen um fast die Hälfte sinken.")
RUNS = {  # name -> (weights dtype, train.* options)
    "preset_80gb": ("bf16", {"master_weights": "bf16", "optimizer": "adamw_8bit", "gradient_checkpointing": "true",
                             "loss_chunk": "128"}),
    "plain_adamw_fp32": ("fp32", {"optimizer": "adamw"}),
    "bf16_torch_adamw": ("bf16", {"master_weights": "bf16", "optimizer": "adamw", "gradient_checkpointing": "true",
                                  "loss_chunk": "128"}),
}
GB = 1e9


def _write(result: dict[str, Any], out: Path) -> None:
    tmp = out.with_name(out.name + ".partial")
    tmp.write_text(json.dumps(result, indent=2, default=str))
    os.replace(tmp, out)


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _batch_data(processor: Any, model: Any, batch: int, seconds: float) -> tuple[list[Any], Collator, list[Example]]:
    examples = [Example(f"b{i}", audio, "de") for i, audio in enumerate(qwen2audio_7b.clips(batch, seconds))]
    items = [TrainItem(ex.id, ex, TARGET, "reference") for ex in examples]
    encoded, _ = encode_items(items, PromptBuilder(processor), processor.feature_extractor, max_length=2048)
    tok = processor.tokenizer
    return encoded, Collator(processor.feature_extractor, tok.pad_token_id or 0, arch.audio_token_id(model)), examples


def train_run(name: str, args: argparse.Namespace, device: str) -> tuple[dict[str, Any], Any, Any, list[Example]]:
    """Build the model, take the steps; (measurements, model, processor, examples)."""
    weights, options = RUNS[name]
    cfg = load_config(FinetuneConfig, None, {"mode": "full", "model.path": "builtin:tiny-random", "model.device": device, "train.batch_size": str(args.batch),
                                             "train.mixed_precision": "bf16" if device == "cuda" else "no",
                                             "train.max_length": "2048", "dev.dataset": "none",
                                             **{f"train.{k}": v for k, v in options.items()}})
    row: dict[str, Any] = {"options": options, "weights": weights}
    _free()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model, processor, build_s = qwen2audio_7b.build(args.arch, device, torch.bfloat16 if weights == "bf16" else torch.float32)
    row["build_s"] = round(build_s, 1)
    setup_full(model, freeze_audio_tower=False, gradient_checkpointing=cfg.train.gradient_checkpointing)
    encoded, collator, examples = _batch_data(processor, model, args.batch, args.seconds)
    micro = collator(encoded)
    seq, targets = int(micro["input_ids"].shape[1]), int((micro["labels"][:, 1:] != -100).sum(-1).max())
    est = memory.estimate(model.config, memory.Shape(batch=args.batch, seconds=args.seconds, sequence=seq, targets=targets),
                          master_weights=cfg.train.master_weights, autocast=device == "cuda", optimizer=cfg.train.optimizer,
                          gradient_checkpointing=cfg.train.gradient_checkpointing, loss_chunk=cfg.train.loss_chunk)
    row.update(sequence=seq, target_tokens_per_item=targets, estimate_gb={k: round(v / GB, 2) if isinstance(v, float) else v
                                                                           for k, v in est.to_dict().items()})
    from stcompress.stages.finetune import make_accelerator

    accelerator = make_accelerator(cfg)
    data = TrainData(train=encoded, dev=[], dev_examples=[], collator=collator)
    trainer = Trainer(cfg, accelerator, TranslationLM(model, loss_chunk=cfg.train.loss_chunk), data, processor=processor,
                      ckpt_dir=Path(tempfile.gettempdir()) / "unused-ckpt", config={}, progress=False)
    trainer.model.train()
    times, tokens = [], []
    try:
        for _ in range(args.steps):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = trainer.train_step([micro])
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            tokens.append(out["tokens"])
            row["loss"] = out["loss"] / max(out["targets"], 1.0)
        row["oom"] = False
    except torch.OutOfMemoryError as exc:
        row.update(oom=True, error=str(exc).splitlines()[0][:300], steps_done=len(times))
    if device == "cuda":
        row["peak_allocated_gb"] = round(torch.cuda.max_memory_allocated() / GB, 2)
        row["peak_reserved_gb"] = round(torch.cuda.max_memory_reserved() / GB, 2)
    row["step_s"] = [round(t, 3) for t in times]
    if len(times) > 1:  # the first step includes allocator warm-up and kernel selection
        row["tokens_per_s"] = round(sum(tokens[1:]) / sum(times[1:]), 1)
    trainer.release()
    del trainer, accelerator
    _free()
    return row, model, processor, examples


def save_and_reload(model: Any, processor: Any, examples: list[Example]) -> dict[str, Any]:
    """The stage's own save (safetensors) and reload check: reload, greedy-decode, compare."""
    from stcompress.model.save import reload_check, save_model

    work = Path(tempfile.mkdtemp(prefix="teacher-memory-"))
    try:
        model.eval()
        t0 = time.perf_counter()
        save_model(model, processor, work / "model")
        saved_s = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in (work / "model").glob("*.safetensors"))
        t0 = time.perf_counter()
        check = reload_check(model, processor, work / "model", examples[:1], max_new_tokens=8)
        return {"save_s": round(saved_s, 1), "safetensors_gb": round(size / GB, 2), "reload_s": round(time.perf_counter() - t0, 1),
                "reload_check": check}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="7b", choices=["7b", "tiny"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--budget", type=float, default=480.0, help="seconds; later phases are skipped past it")
    args = p.parse_args()
    out_dir = Path(os.environ.get("OUT", "benchmarks/results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "teacher_memory.json"
    import transformers

    start = time.perf_counter()
    result: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "arch": args.arch, "device": args.device,
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None, "batch": args.batch, "seconds": args.seconds,
        "steps": args.steps, "torch": torch.__version__, "transformers": transformers.__version__, "runs": {},
    }
    try:
        import bitsandbytes

        result["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        result["bitsandbytes"] = None
        RUNS["preset_80gb"][1]["optimizer"] = "adamw"  # recorded: the preset then runs with torch AdamW
        result["note"] = "bitsandbytes missing: preset_80gb ran with torch AdamW (bf16 states)"
    for name in ("preset_80gb", "plain_adamw_fp32", "bf16_torch_adamw"):
        if time.perf_counter() - start > args.budget:
            result["runs"][name] = {"skipped": f"time budget of {args.budget:.0f} s spent"}
            continue
        model = None
        try:
            row, model, processor, examples = train_run(name, args, args.device)
            result["runs"][name] = row
            _write(result, out)
            if name == "preset_80gb" and not row["oom"]:
                result["save_reload"] = save_and_reload(model, processor, examples)
        except Exception as exc:  # recorded, and the next run still happens
            result["runs"].setdefault(name, {})["error"] = "".join(traceback.format_exception_only(type(exc), exc))[-800:]
            result["runs"][name]["traceback"] = traceback.format_exc()[-3000:]
        finally:
            del model
            _free()
        result["elapsed_s"] = round(time.perf_counter() - start, 1)
        _write(result, out)
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
