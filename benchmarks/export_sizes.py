"""Export formats on the real 7B architecture (random weights): bytes, export time, memory, speed.

For bf16 and each format whose library is installed (int8 and nf4 need bitsandbytes; hqq needs
transformers 4.5x): bytes on disk (safetensors, as the track counts them), the size of
`torch.save(state_dict)` (the organisers' scripts), the predicted bytes (stcompress.sizes), the
time to quantize and save, peak GPU memory, and greedy decode tokens/s at batch 1 and 32.
Every step is guarded; the JSON is rewritten after each, so a failure keeps what came before.

    python benchmarks/export_sizes.py --arch 7b --device cuda --out $OUT/export_sizes.json
    PYTHONPATH=src python benchmarks/export_sizes.py --arch tiny --device cpu --out /tmp/x.json  # dry run
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from qwen2audio_7b import build, clips  # noqa: E402

from stcompress import quantize  # noqa: E402
from stcompress.config import GenerationConfig, ModelConfig, PromptConfig  # noqa: E402
from stcompress.data.example import Example  # noqa: E402
from stcompress.metrics.efficiency import weight_bytes  # noqa: E402
from stcompress.model.load import load_model  # noqa: E402
from stcompress.model.save import save_model  # noqa: E402
from stcompress.sizes import predict  # noqa: E402
from stcompress.translate import Translator  # noqa: E402


class _Counter:
    """A write-only file that counts bytes: torch.save's size without writing the file."""

    def __init__(self) -> None:
        self.n = 0

    def write(self, b) -> int:
        self.n += len(b)
        return len(b)

    def flush(self) -> None:
        pass


def torch_save_bytes(model) -> int:
    counter = _Counter()
    torch.save(model.state_dict(), counter)
    return counter.n


def speed(model, processor, device: str, batch: int, new_tokens: int) -> dict:
    examples = [Example(id=str(i), audio=a, target_lang="de") for i, a in enumerate(clips(batch, 4.0))]
    gen = GenerationConfig(max_new_tokens=new_tokens, batch_size=batch)
    translator = Translator(model, processor, PromptConfig(), gen, progress=False)
    translator.translate(examples[:1])  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    hyps = translator.translate(examples)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    tokens = sum(h.n_tokens for h in hyps)
    return {"batch": batch, "seconds": round(seconds, 3), "tokens": tokens, "tokens_per_s": round(tokens / seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="7b", choices=["7b", "tiny"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", required=True)
    ap.add_argument("--formats", default="none,int8,nf4,hqq")
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    out = Path(args.out)
    result: dict = {"arch": args.arch, "device": args.device, "torch": torch.__version__, "formats": {}}

    def dump() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))

    work = Path(tempfile.mkdtemp(prefix="export-sizes-"))
    try:
        model, processor, built = build(args.arch, args.device, torch.bfloat16)
        result["build_s"] = round(built, 1)
        full = work / "bf16"
        save_model(model, processor, full)
        config = model.config
        del model
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
        dump()
        for fmt in args.formats.split(","):
            entry: dict = result["formats"].setdefault(fmt, {})
            try:
                quantize.check_library(fmt)
                chosen = quantize.component_bits(fmt, "", ("lm_head",))
                entry["bits"] = chosen
                entry["predicted_bytes"] = predict(config, fmt, chosen, "bfloat16")["total"]
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                cfg = ModelConfig(path=str(full), dtype="bfloat16", device=args.device)
                if fmt == "none":
                    loaded, target = load_model(cfg), full
                elif fmt == "hqq":
                    loaded = load_model(cfg)
                    quantize.hqq_quantize(loaded.model, chosen, 64, torch.bfloat16)
                    target = work / fmt
                else:
                    q = quantize.library_config(fmt, chosen, None, torch.bfloat16)
                    loaded, target = load_model(cfg, quantization=q), work / fmt
                if target != full:
                    save_model(loaded.model, loaded.processor, target)
                entry["export_s"] = round(time.perf_counter() - t0, 1)
                entry["bytes_on_disk"] = weight_bytes(target)
                entry["torch_save_bytes"] = torch_save_bytes(loaded.model)
                if torch.cuda.is_available():
                    entry["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                dump()
                entry["decode"] = [speed(loaded.model, loaded.processor, args.device, b, args.new_tokens) for b in (1, 32)]
                del loaded
                if target != full:
                    shutil.rmtree(target, ignore_errors=True)
            except Exception as exc:  # one format failing must not lose the others
                entry["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
                entry["traceback"] = traceback.format_exc()[-2000:]
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
            dump()
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"[:500]
        result["traceback"] = traceback.format_exc()[-3000:]
    finally:
        dump()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
