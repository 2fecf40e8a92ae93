"""Which ASR warm-up makes the testbed's projector hear? Variants trained side by side (GPU, one call).

Run 2's projector-only ASR stage (LM frozen, 238 steps, cosine to zero) ended on the plateau:
train loss flat at 3.0, dev transcripts fluent English unrelated to the clip (asr-dev chrF 13.3).
This trains several ASR set-ups concurrently on the same GPU (each is launch-bound: the 270M LM
leaves the H200 mostly idle), each through `stcompress finetune` with a constant learning rate and
dev chrF (transcripts of the dev voice against the English text) every `--dev-every` steps, and
writes the curves. The variant whose dev chrF rises is the recipe's new `asr` stage.

    PYTHONPATH=src python benchmarks/testbed/asr_study.py --data runs/testbed-data/de --base runs/testbed/base \
        --work /tmp/tb/asr-study --out $OUT/asr-study --budget 470

Variants (`--variants`, comma-separated names of VARIANTS): the projector alone at two learning
rates (does the plateau break with sustained steps?), the projector with the whole LM
(full fine-tuning at two learning rates), LoRA on the LM over the random projector, and LoRA on
the LM with the projector's own weights training (`lora.train_projector`, the recipes' choice).

Measured (2026-12-02, one H200; benchmarks/testbed/results/asr-study/): full-1e-4 alone, dev ASR
chrF 27.6 / 37.5 / 40.9 / 44.7 / 43.1 at steps 300-1500 (5.2 steps/s; train loss 0.02-0.05 from
step ~1,000: it memorises the 5,000 training sentences). Five variants at once with 16 threads
each starved the CPU (tower cache 362 s, 1.7 s a step): each process now gets cores / variants.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

VARIANTS = {
    "proj-1e-3": {"mode": "full", "lr": 1.0e-3, "freeze_lm": True},
    "proj-4e-3": {"mode": "full", "lr": 4.0e-3, "freeze_lm": True},
    "full-1e-4": {"mode": "full", "lr": 1.0e-4, "freeze_lm": False},
    "full-3e-5": {"mode": "full", "lr": 3.0e-5, "freeze_lm": False},
    "lora-5e-4": {"mode": "lora", "lr": 5.0e-4, "freeze_lm": False},
    # LoRA on the LM + the projector's own weights (lora.train_projector): what the recipes use,
    # since a full fine-tune's LM weights cannot be committed (Gemma terms) and LoRA adapters can
    "lora-tp-3e-4": {"mode": "lora", "lr": 3.0e-4, "freeze_lm": False, "train_projector": True},
    "lora-tp-1e-3": {"mode": "lora", "lr": 1.0e-3, "freeze_lm": False, "train_projector": True},
}
DEV_LINE = re.compile(r"step (\d+): dev loss ([0-9.]+), chrF ([0-9.]+)")


def config(name: str, args: argparse.Namespace) -> dict:
    v = VARIANTS[name]
    train = {"max_steps": args.max_steps, "epochs": 1000, "batch_size": args.batch_size, "lr": v["lr"],
             "scheduler": "constant", "warmup_steps": 50, "weight_decay": 0.0, "freeze_audio_tower": True,
             "cache_audio": True, "mixed_precision": args.mixed_precision, "save_dtype": "float32",
             "log_every": 20, "save_every": 0}
    if v["mode"] == "full":
        train["freeze_language_model"] = v["freeze_lm"]
    cfg = {
        "output": str(args.work / name / "out"), "mode": v["mode"],
        "model": {"path": str(args.base), "dtype": "float32"},
        "data": {"dataset": str(args.data / "train.jsonl"), "reference_column": "text_en", "target_lang": "en",
                 "subset": "all", **({"limit": args.limit} if args.limit else {})},
        "dev": {"dataset": str(args.data / "dev.jsonl"), "metric": "chrf", "chrf_segments": args.dev_segments,
                "batch_size": args.dev_segments, "max_new_tokens": 64, "every": args.dev_every, "patience": 0},
        "prompt": {"system": "You are a professional transcriber.", "instruction": "Transcribe the {language} speech:"},
        "train": train,
    }
    if v["mode"] == "lora":
        cfg["lora"] = {"r": 24, "alpha": 48, "dropout": 0.0, "rslora": True, "targets": ["all-linear"], "audio_tower": False,
                       "train_projector": bool(v.get("train_projector"))}
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--budget", type=float, default=470, help="seconds for all variants together (then stopped)")
    ap.add_argument("--max-steps", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--dev-every", type=int, default=200)
    ap.add_argument("--dev-segments", type=int, default=150)
    ap.add_argument("--limit", type=int, default=0, help="training items (0: all; CPU smoke runs)")
    ap.add_argument("--mixed-precision", default="bf16")
    args = ap.parse_args()
    names = [n for n in args.variants.split(",") if n]
    bad = [n for n in names if n not in VARIANTS]
    if bad:
        sys.exit(f"asr_study: unknown variant {bad[0]!r}; choose from {', '.join(VARIANTS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    procs = {}
    for n in names:
        d = args.work / n
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.yaml").write_text(yaml.safe_dump(config(n, args), sort_keys=False))
        log = (d / "log.txt").open("w")
        # Each process gets its share of the cores: five 16-thread processes on 16 cores took 362 s to
        # cache the tower output (one alone: ~80 s) and then 1.7 s a step (alone: 0.19 s).
        threads = str(max(1, (os.cpu_count() or 1) // len(names)))
        env = os.environ.copy() | {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        procs[n] = (subprocess.Popen([sys.executable, "-m", "stcompress", "finetune", "-c", str(d / "config.yaml")],
                                     stdout=log, stderr=subprocess.STDOUT, env=env), log)
    while any(p.poll() is None for p, _ in procs.values()) and time.time() - start < args.budget:
        time.sleep(2)
    for n, (p, log) in procs.items():
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
    for n, (p, log) in procs.items():
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
        log.close()
    results = {"command": " ".join(sys.argv), "elapsed_s": round(time.time() - start, 1), "variants": {}}
    for n in names:
        d = args.work / n
        text = (d / "log.txt").read_text(errors="replace")
        dev = [{"step": int(a), "dev_loss": float(b), "dev_chrf": float(c)} for a, b, c in DEV_LINE.findall(text)]
        hist = d / "out" / "history.jsonl"
        train = [json.loads(line) for line in hist.read_text().splitlines()] if hist.is_file() else []
        manifest = d / "out" / "manifest.json"
        timings = json.loads(manifest.read_text()).get("timings") if manifest.is_file() else None
        results["variants"][n] = {"config": VARIANTS[n], "finished": manifest.is_file(), "exit": procs[n][0].returncode,
                                  "dev": dev, "train": [r for r in train if r.get("kind") == "train"], "timings": timings,
                                  "log_tail": text.splitlines()[-8:]}
        lines = [line for line in text.replace("\r", "\n").splitlines() if line.strip() and "steps/s" not in line]
        bars = [line for line in text.replace("\r", "\n").splitlines() if "steps/s, loss=" in line]
        (args.out / f"{n}.log").write_text("\n".join(lines[-400:] + bars[::50] + bars[-1:]) + "\n")
    (args.out / "asr_study.json").write_text(json.dumps(results, indent=1))
    for n, r in results["variants"].items():
        curve = ", ".join(f"{x['step']}: {x['dev_chrf']:.1f}" for x in r["dev"])
        print(f"{n:10s} finished={r['finished']} dev chrF by step: {curve or '-'}")


if __name__ == "__main__":
    main()
