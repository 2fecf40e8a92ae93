"""Bytes on disk of each export format on the real Qwen2-Audio-7B architecture, by arithmetic.

No weights: stcompress.sizes predicts tensor bytes from the config (exact for int8, hqq and autoround, within
0.1% for nf4 on the tiny model: tests/test_quantize.py). Decoder layers 32 / 24 / 16 (pruned).
Run: PYTHONPATH=src python benchmarks/export_size_table.py > benchmarks/results/export_size_table_7b.md
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from qwen2audio_7b import config  # noqa: E402

from stcompress.quantize import component_bits  # noqa: E402
from stcompress.sizes import predict  # noqa: E402

POINTS = [  # (label, format, bits)
    ("bf16", "none", ""),
    ("int8, lm_head bf16", "int8", ""),
    ("nf4, lm_head bf16 (paper)", "nf4", ""),
    ("nf4 everywhere", "nf4", "lm_head=4"),
    ("hqq 4-bit, lm_head 8", "hqq", "lm_head=8"),
    ("autoround 4-bit decoder (calibrated, g128), rest bf16", "autoround", ""),
    ("autoround 8-bit decoder (calibrated, g128), rest bf16", "autoround", "decoder_layers=8"),
    ("hqq 3-bit decoder, lm_head 8, tower 4", "hqq", "decoder_layers=3,lm_head=8"),
    ("hqq 2-bit decoder, lm_head 4, tower 4", "hqq", "decoder_layers=2,lm_head=4"),
]


def main() -> None:
    print("| decoder layers | export | audio tower | decoder | embed | lm_head | total GB |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for layers in (32, 24, 16):
        cfg = copy.deepcopy(config("7b"))
        cfg.text_config.num_hidden_layers = layers
        for label, fmt, bits in POINTS:
            s = predict(cfg, fmt, component_bits(fmt, bits, ("lm_head",)), "bfloat16")
            gb = {k: f"{v / 1e9:.3f}" for k, v in s.items()}
            print(f"| {layers} | {label} | {gb['audio_tower']} | {gb['decoder_layers']} | {gb['embed_tokens']} | "
                  f"{gb['lm_head']} | {gb['total']} |")


if __name__ == "__main__":
    main()
