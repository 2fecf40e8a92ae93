"""Run a testbed recipe end to end on CPU in minutes: same stages, a tiny Gemma-3 testbed model.

The model comes from the same pack -> materialise path as the real one, built from a tiny random
Gemma 3 text model (12 layers: global attention at layers 5 and 11) written as a llama.cpp-style
GGUF; the data is the built-in demo task, a few clips per stage. Every stage of the recipe runs
(teacher, importance with proxies, prune at sliding and global layers, KD, QLoRA, LoRA, export,
evaluate, report), so a GPU window is not lost to a bug.

    PYTHONPATH=src python benchmarks/testbed/smoke_cpu.py recipes/testbed-de.yaml --out runs/testbed-smoke
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

TINY = {  # stage name -> overrides (layer numbers for a 12-layer model; 5 and 11 are global)
    "prune25": {"num_layers": 1}, "prune50": {"num_layers": 2},
    "mid25": {"layers": [5]}, "mid50": {"layers": [4, 5, 6]},
    "importance": {"rounds": 2, "generation": {"batch_size": 8}},
}


def tiny_base(out: Path) -> Path:
    import torch
    from test_testbed import TEXTS, _tiny_bpe_json, _write_gemma_gguf
    from transformers import Gemma3TextConfig, Gemma3TextModel, Qwen2AudioConfig, Qwen2AudioEncoder

    from stcompress.testbed import pack, vocab
    from stcompress.testbed.model import materialise

    if (out / "base" / "config.json").is_file():
        return out / "base"
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    full = _tiny_bpe_json()
    config = Gemma3TextConfig(vocab_size=len(full["model"]["vocab"]), hidden_size=64, intermediate_size=128,
                              num_hidden_layers=12, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                              sliding_window=16, query_pre_attn_scalar=32, max_position_embeddings=1024)
    _write_gemma_gguf(out / "gemma.gguf", Gemma3TextModel(config))
    audio = Qwen2AudioConfig(audio_config=dict(model_type="qwen2_audio_encoder", num_mel_bins=80, encoder_layers=2,
                                               encoder_attention_heads=2, encoder_ffn_dim=128, d_model=128)).audio_config
    whisper = {k: v.half().float() for k, v in Qwen2AudioEncoder(audio).state_dict().items()}
    trimmed, old_ids = vocab.trim_tokenizer_json(full, TEXTS)
    p = pack.write_pack(out / "gemma.gguf", whisper, pack.gemma_text_config(config, len(old_ids)), json.dumps(trimmed),
                        old_ids, out / "pack.gguf", {"smoke": True})
    return materialise(p, out / "base")


def shrink(recipe: dict, base: Path, run_dir: Path) -> dict:
    split_of = {"train": "builtin:demo-train", "dev": "builtin:demo-dev", "test": "builtin:demo-test"}

    def walk(node, stage):
        if isinstance(node, dict):
            out = {k: walk(v, stage) for k, v in node.items()}
            if isinstance(out.get("dataset"), str) and out["dataset"].startswith("runs/testbed-data/"):
                out["dataset"] = split_of[Path(out["dataset"]).stem]
                out["limit"] = 6
            if out.get("path") == "runs/testbed/base":
                out["path"] = str(base)
            if "epochs" in out:
                out.update(epochs=1, max_steps=2, batch_size=4, log_every=1)
            if "max_new_tokens" in out:
                out["max_new_tokens"] = 8
            return out
        if isinstance(node, list):
            return [walk(v, stage) for v in node]
        return node

    recipe = dict(recipe, run_dir=str(run_dir))
    recipe["defaults"] = walk(recipe["defaults"], None)
    recipe["defaults"]["generation"].update(max_new_tokens=8, batch_size=8)
    recipe["defaults"]["model"]["device"] = "cpu"
    stages = []
    for st in recipe["stages"]:
        cfg = walk(st.get("config", {}), st["name"])
        for k, v in TINY.get(st["name"], {}).items():
            cfg[k] = dict(cfg.get(k, {}), **v) if isinstance(v, dict) else v
        if cfg.get("train"):
            cfg["train"]["mixed_precision"] = "no"
        stages.append(dict(st, config=cfg))
    recipe["stages"] = stages
    return recipe


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe", type=Path)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "testbed-smoke")
    args = ap.parse_args()
    base = tiny_base(args.out / "model")
    lang = args.recipe.stem.split("-")[-1]
    recipe = shrink(yaml.safe_load(args.recipe.read_text()), base, args.out / f"run-{lang}")
    path = args.out / f"smoke-{lang}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True))
    print(path)
    return subprocess.call([sys.executable, "-m", "stcompress", "run", str(path)])


if __name__ == "__main__":
    sys.exit(main())
