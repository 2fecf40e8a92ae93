"""Predicted bytes on disk per component for an export format and bits, from a config alone.

Arithmetic over the model's tensor shapes (built on the meta device, so the 7B costs nothing),
with each library's stored layout as measured from its safetensors files (stcompress.quantize):
nf4 packs two weights a byte plus a uint8 absmax per 64 (double quantization); int8 stores a byte
a weight plus an fp32 scale per output row; hqq packs n-bit codes (3-bit: ten per int32) plus a
scale and a zero per group in the compute dtype; autoround (compressed-tensors pack-quantized) packs
n-bit codes into int32 rows plus an fp16 scale per group and the int64 shape. Safetensors headers
are not predicted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from stcompress.model import arch
from stcompress.quantize import KEEP, group_size as format_group_size

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def _linear_bytes(fmt: str, bits: int, out_f: int, in_f: int, dtype: str, group_size: int) -> int:
    n, d = out_f * in_f, _DTYPE_BYTES[dtype]
    if bits == KEEP:
        return n * d
    if fmt == "int8":
        return n + 4 * out_f + 1
    if fmt == "autoround":
        return out_f * math.ceil(in_f * bits / 32) * 4 + out_f * math.ceil(in_f / group_size) * 2 + 16
    if fmt == "nf4":
        blocks = math.ceil(n / 64)
        return math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / 256) + 4 * 256 + 4 * 16 + 167
    groups = math.ceil(n / group_size)
    packed = math.ceil(groups / 10) * group_size * 4 if bits == 3 else math.ceil(n * bits / 8)
    meta = 16 + 12 + 9 + len(str(getattr(torch, dtype))) + 7 + 11
    return packed + 2 * groups * d + meta


def predict(config: Any, fmt: str, chosen: Mapping[str, int], dtype: str, group_size: int | None = None, *,
            vocab_size: int | None = None) -> dict[str, int]:
    """Bytes per component (arch.COMPONENTS) and their total, for `chosen` bits per component
    (`group_size` None: the format's default).

    `vocab_size`: embedding and LM-head rows after `export --trim-vocab` (vocab_trim.plan gives the
    kept count); None: the config's own. A tied head is counted once, as safetensors stores it.
    """
    group_size = format_group_size(fmt, group_size)
    model = arch.meta_model(config, vocab_size)
    linears = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    sizes = dict.fromkeys(arch.COMPONENTS, 0)
    for name, param in model.named_parameters():
        component = arch.component_of(name)
        module = name.rpartition(".")[0]
        if name.endswith(".weight") and module in linears and fmt != "none":
            out_f, in_f = param.shape
            sizes[component] += _linear_bytes(fmt, chosen.get(component, KEEP), out_f, in_f, dtype, group_size)
        else:
            sizes[component] += param.numel() * _DTYPE_BYTES[dtype]
    return {**sizes, "total": sum(sizes.values())}
