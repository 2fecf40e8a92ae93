"""The trimmed audio tower (`arch.tower_states`) against transformers' full 30 s window.

For clips of several lengths (a batch of 8 each), on the 7B architecture with random weights:
output agreement with transformers' own encoder forward on the content positions, time of both,
the cost of the tower fingerprint that keys the cross-stage memo (`model/tower_memo.py`), and a
short translation through the engine (checks the memo / projector path on the device).

    python benchmarks/tower_trim.py --arch 7b --device cuda --out results.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from qwen2audio_7b import build, clips  # noqa: E402

from stcompress.config import GenerationConfig  # noqa: E402
from stcompress.data.example import Example  # noqa: E402
from stcompress.model import arch, tower_memo  # noqa: E402
from stcompress.translate import Translator  # noqa: E402


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeat: int = 3):
    fn()
    sync(device)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return out, best


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="7b", choices=["7b", "tiny"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--seconds", default="2,5,10,20,30")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model, processor, build_s = build(args.arch, args.device, dtype)
    tower, extractor = arch.audio_tower(model), processor.feature_extractor
    rows = []
    for seconds in [float(s) for s in args.seconds.split(",")]:
        audio = clips(args.batch, seconds, seed=int(seconds))
        feats = extractor(audio, sampling_rate=16000, padding="max_length", return_attention_mask=True, return_tensors="pt")
        features = feats["input_features"].to(args.device, dtype)
        mask = feats["attention_mask"].to(args.device)
        conv_lengths, out_lengths = tower._get_feat_extract_output_lengths(mask.sum(-1))
        width = tower.config.max_source_positions
        pad = torch.arange(width, device=args.device)[None, :] >= conv_lengths[:, None]
        attn = torch.zeros(args.batch, 1, width, width, dtype=dtype, device=args.device)
        attn.masked_fill_(pad[:, None, None, :], torch.finfo(dtype).min)
        full, full_s = timed(lambda: tower(features, attention_mask=attn).last_hidden_state, args.device)
        (trim, lengths), trim_s = timed(lambda: arch.tower_states(model, features, mask), args.device)
        diffs, scale = [], []
        for i, n in enumerate(lengths.tolist()):
            diffs.append((trim[i, :n].float() - full[i, :n].float()).abs().max().item())
            scale.append(full[i, :n].float().abs().max().item())
        rows.append({"seconds": seconds, "full_window_ms": round(1000 * full_s, 2), "trimmed_ms": round(1000 * trim_s, 2),
                     "speedup": round(full_s / trim_s, 2), "max_abs_diff": max(diffs), "max_abs_value": max(scale)})
        print(rows[-1], flush=True)
    tower_memo.MEMO.clear()
    t0 = time.perf_counter()
    fp = tower_memo.MEMO.fingerprint(model, extractor)
    fingerprint_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = tower_memo.MEMO.fingerprint(model, extractor)
    cached_s = time.perf_counter() - t0
    examples = [Example(id=f"c{i}", audio=a, target_lang="de") for i, a in enumerate(clips(4, 6.0, seed=7))]
    translator = Translator(model, processor, generation=GenerationConfig(max_new_tokens=8, batch_size=4), progress=False)
    t0 = time.perf_counter()
    first = translator.translate(examples)
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    second = translator.translate(examples)  # tower output from the memo
    second_s = time.perf_counter() - t0
    tower_params = sum(t.numel() for t in tower.parameters())
    result = {
        "arch": args.arch, "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "dtype": str(dtype), "batch": args.batch, "build_s": round(build_s, 1), "rows": rows,
        "tower_parameters": tower_params, "fingerprint_s": round(fingerprint_s, 3), "fingerprint_cached_s": round(cached_s, 5),
        "fingerprint_stable": fp == again and fp is not None,
        "translate_first_s": round(first_s, 3), "translate_memo_s": round(second_s, 3),
        "memo_hits": tower_memo.MEMO.hits, "same_output": [h.text for h in first] == [h.text for h in second],
    }
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
