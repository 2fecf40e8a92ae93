"""QLoRA on the 24-layer pruned 7B architecture, then bf16 and NF4 exports, through the product stages.

The real Qwen2-Audio-7B-Instruct shapes with random bf16 weights (cost, not quality): remove the
paper's 8 German layers, save, run `finetune` in qlora mode at batch 4 on 30 s clips, then
`export` (LoRA merged into the bf16 base) and `export --quantize nf4`. Records training tokens/s,
peak GPU memory, trainable share (paper: 2.41%) and bytes on disk per component.

    python benchmarks/qlora_verify.py --work /tmp/qv --out results.json
    python benchmarks/qlora_verify.py --arch tiny --device cpu --work /tmp/qv --out r.json   # dry run
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from qwen2audio_7b import build  # noqa: E402

from stcompress.config import DataConfig, DevConfig, ExportConfig, FinetuneConfig, ModelConfig, TrainConfig  # noqa: E402
from stcompress.model.layers import remove_decoder_layers  # noqa: E402
from stcompress.model.save import save_model  # noqa: E402
from stcompress.stages import export, finetune  # noqa: E402

PAPER_DE_LAYERS = [1, 3, 9, 13, 19, 20, 27, 29]
SENTENCE = ("In diesem Vortrag zeigen wir, wie man ein großes Sprachmodell für die Übersetzung gesprochener "
            "Sprache verkleinert, ohne an Qualität zu verlieren, und welche Schichten dabei entfernt werden können.")


def write_clips(directory: Path, n: int, seconds: float) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        path = directory / f"clip{i}.wav"
        sf.write(path, (0.1 * rng.standard_normal(int(16000 * seconds))).astype(np.float32), 16000)
        rows.append({"id": f"clip{i}", "audio": path.name, "text_en": "a talk", "text_de": SENTENCE})
    manifest = directory / "train.jsonl"
    manifest.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return manifest


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=["7b", "tiny"], default="7b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--clip-seconds", type=float, default=29.9)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("transformers", "accelerate", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    record: dict = {"command": " ".join(sys.argv), "torch": torch.__version__,
                    "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"}
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    t0 = time.perf_counter()
    model, processor, _ = build(args.arch, args.device, dtype)
    remove_decoder_layers(model, PAPER_DE_LAYERS)
    pruned = save_model(model, processor, args.work / "pruned")
    record["prune_and_save_seconds"] = time.perf_counter() - t0
    del model
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    manifest = write_clips(args.work / "data", 8, args.clip_seconds)
    data = DataConfig(dataset=str(manifest), target_lang="de")
    ft_out = args.work / "finetune"
    cfg = FinetuneConfig(
        output=str(ft_out), mode="qlora", model=ModelConfig(path=str(pruned), device=args.device), data=data,
        train=TrainConfig(batch_size=4, max_steps=args.steps, epochs=100, log_every=1, check_segments=1,
                          gradient_checkpointing=args.gradient_checkpointing),
        dev=DevConfig(dataset="none"),
    )
    t0 = time.perf_counter()
    finetune.run(cfg, progress=False)
    record["finetune_seconds"] = time.perf_counter() - t0
    ft = json.loads((ft_out / "manifest.json").read_text())
    record["finetune"] = {k: ft.get(k) for k in ("training", "lora", "decoder_layers", "data")}
    print(json.dumps(record, indent=1, default=str), flush=True)
    for quantize in ("none", "nf4"):
        out = args.work / f"export-{quantize}"
        t0 = time.perf_counter()
        export.run(ExportConfig(output=str(out), input=str(ft_out), quantize=quantize, device=args.device,
                                dtype="bfloat16" if args.device.startswith("cuda") else "float32", data=data,
                                check_segments=2, check_max_new_tokens=8, check_min_agreement=0.01), progress=False)
        em = json.loads((out / "manifest.json").read_text())
        record[f"export_{quantize}"] = {"seconds": time.perf_counter() - t0, "size": em.get("size"),
                                        "reload_check": em.get("reload_check"), "model": em.get("model")}
        print(json.dumps({f"export_{quantize}": record[f"export_{quantize}"]}, indent=1, default=str), flush=True)
        shutil.rmtree(out, ignore_errors=True)  # disk: the 7B exports are 13.6 GB / ~5 GB
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
