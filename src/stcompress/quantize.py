"""Export formats and per-component precision, each through a maintained library.

Chosen by measurement on CPU (bitsandbytes 0.50.2, hqq 0.2.8, torchao 0.18; tiny Qwen2-Audio,
save -> plain from_pretrained -> logits):

| format | library | bits | reloads on 4.57 | reloads on 5.x | stored |
|---|---|---|---|---|---|
| nf4 | bitsandbytes | 4 | yes | yes | packed 4-bit + uint8 absmax per 64 |
| int8 | bitsandbytes LLM.int8 | 8 | yes | yes | int8 + fp32 scale per row |
| hqq | hqq (HqqConfig) | 1, 2, 3, 4, 8 | yes | no | packed n-bit + scale/zero per group |
| autoround | auto-round -> compressed-tensors | 4, 8 (decoder) | yes | yes | n-bit codes in int32 + fp16 scale per 128 |

transformers 5.x cannot quantize to HQQ (NotImplementedError) and loads an HQQ checkpoint as a
plain model with random linear weights, so `hqq` is refused there. torchao's
IntxWeightOnlyConfig reloads on 5.x but stores sub-8-bit weights unpacked in int8 on CPU (no
smaller than int8), so it is not offered. Embeddings stay in `dtype` in every format: none of
these libraries quantizes nn.Embedding through from_pretrained.

autoround is the calibrated format (stcompress.calibrated has its measurements): it quantizes the
LM decoder layers only; the audio tower, projector, embeddings and LM head stay in `dtype`.

Bits per component: `bits` maps audio_tower, projector, decoder_layers, lm_head to a bit width
the format supports, or 16 (kept in the export dtype).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from typing import Any

import torch
import transformers
from packaging.version import Version

from stcompress.errors import ModelError
from stcompress.model import arch

FORMATS = ("none", "nf4", "int8", "hqq", "autoround")
KEEP = 16  # "bits" of a component left in the export dtype
BITS_COMPONENTS = ("audio_tower", "projector", "decoder_layers", "lm_head", "embed_tokens")
_ALIASES = {"decoder": "decoder_layers", "layers": "decoder_layers", "embed": "embed_tokens", "embedding": "embed_tokens",
            "tower": "audio_tower", "audio": "audio_tower", "head": "lm_head"}
# Bit widths each format stores (besides KEEP).
FORMAT_BITS = {"none": (), "nf4": (4,), "int8": (8,), "hqq": (1, 2, 3, 4, 8), "autoround": (4, 8)}
_LIBRARY = {"nf4": "bitsandbytes", "int8": "bitsandbytes", "hqq": "hqq", "autoround": "auto_round"}
_EXTRA = {"bitsandbytes": "stcompress[quant]", "hqq": "stcompress[quant]", "auto_round": "stcompress[quant]",
          "compressed_tensors": "stcompress[quant]"}
HQQ_GROUP_SIZES = (32, 64, 128, 256)
GROUP_SIZES = {"hqq": HQQ_GROUP_SIZES, "autoround": (32, 64, 128)}
DEFAULT_GROUP_SIZE = {"hqq": 64, "autoround": 128}
# Components a format can store in fewer bits (autoround calibrates the decoder layers only).
_QUANTIZABLE = {"autoround": ("decoder_layers",)}


def group_size(fmt: str, value: int | None) -> int:
    """The configured group size, or the format's default (hqq 64, autoround 128)."""
    return value if value is not None else DEFAULT_GROUP_SIZE.get(fmt, 64)


def parse_bits(spec: str) -> dict[str, int]:
    """'decoder=4,lm_head=8' -> {'decoder_layers': 4, 'lm_head': 8}; raises ValueError naming the item."""
    out: dict[str, int] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, sep, value = item.partition("=")
        name = _ALIASES.get(name.strip(), name.strip())
        if not sep or name not in BITS_COMPONENTS or not value.strip().isdigit():
            raise ValueError(
                f"bits: {item!r} is not COMPONENT=BITS with COMPONENT one of {', '.join(BITS_COMPONENTS)} "
                "(e.g. decoder_layers=4,lm_head=8)"
            )
        out[name] = int(value)
    return out


def component_bits(fmt: str, bits: str, keep_unquantized: tuple[str, ...]) -> dict[str, int]:
    """Bits of every component: the format's width for linear components, KEEP for the embedding,
    for `keep_unquantized` and for everything when fmt is none; `bits` overrides."""
    width = max(FORMAT_BITS[fmt], default=KEEP) if fmt not in ("hqq", "autoround") else 4
    only = _QUANTIZABLE.get(fmt, BITS_COMPONENTS)
    out = {c: (KEEP if fmt == "none" or c in keep_unquantized or c == "embed_tokens" or c not in only else width)
           for c in BITS_COMPONENTS}
    out.update(parse_bits(bits))
    return out


def bits_problems(fmt: str, bits: str, keep_unquantized: tuple[str, ...], group: int | None) -> list[str]:
    """Config problems of the format and bits, all at once, before anything loads."""
    try:
        chosen = component_bits(fmt, bits, keep_unquantized)
    except ValueError as exc:
        return [str(exc)]
    out = []
    allowed = (*FORMAT_BITS[fmt], KEEP)
    for c, b in chosen.items():
        if c == "embed_tokens" and b != KEEP:
            out.append(f"bits: embed_tokens={b}: embeddings stay in the export dtype in every format; drop it or use 16")
        elif b != KEEP and c not in _QUANTIZABLE.get(fmt, BITS_COMPONENTS):
            out.append(f"bits: {c}={b}: quantize {fmt} calibrates the decoder layers only; drop it or use 16 "
                       "(nf4 / int8 / hqq quantize the other components)")
        elif b not in allowed:
            out.append(f"bits: {c}={b} is not stored by quantize {fmt}; use one of {', '.join(map(str, allowed))}")
    if fmt in GROUP_SIZES and group_size(fmt, group) not in GROUP_SIZES[fmt]:
        out.append(f"group_size: {group} is not one of {', '.join(map(str, GROUP_SIZES[fmt]))} (quantize {fmt})")
    return out


# bitsandbytes' CUDA int8 matmul (cuBLASLt) fails ("cublasLt ran into an error!", status 15) on a
# layer whose output features are not a multiple of 4 once a call has 64-96 rows or more (a batch
# of 150 translations; sooner for larger layers): bitsandbytes 0.50.2 falls back to fp32 for an
# unaligned *inner* dimension only. Measured on an H200: benchmarks/results/bnb_int8_shapes_h200.md.
# Such an export reloads and passes a 2-clip check, then fails at serving batch sizes: refused.
INT8_OUT_MULTIPLE = 4
_INT8_FIX = {"lm_head": "trim the vocabulary (--trim-vocab keeps a multiple of 8 rows) or keep the LM head: --bits lm_head=16",
             "decoder_layers": "use quantize nf4 or hqq (bitsandbytes int8 always quantizes the decoder)"}


def int8_misfits(shapes: list[tuple[str, str, int, int]], chosen: Mapping[str, int]) -> dict[str, list[tuple[str, int]]]:
    """Per component stored in int8: its linear layers (name, out_features) that bitsandbytes'
    CUDA int8 matmul cannot run at batch sizes of 64-96 and more (`shapes`: arch.linear_shapes)."""
    out: dict[str, list[tuple[str, int]]] = {}
    for name, component, out_f, _ in shapes:
        if chosen.get(component, KEEP) == 8 and out_f % INT8_OUT_MULTIPLE:
            out.setdefault(component, []).append((name, out_f))
    return out


def int8_problems(fmt: str, chosen: Mapping[str, int], model_config: Any, *, vocab_size: int | None = None) -> list[str]:
    """Why an int8 export of this model (config alone, no weights) would fail on CUDA; [] if it runs.
    `vocab_size`: the LM head rows after trimming (None: the config's)."""
    if fmt != "int8":
        return []
    misfits = int8_misfits(arch.linear_shapes(arch.meta_model(model_config, vocab_size)), chosen)
    return [f"quantize int8 with {c}=8: {len(layers)} of its linear layers have output features that are not a multiple "
            f"of {INT8_OUT_MULTIPLE} (e.g. {layers[0][0]}: {layers[0][1]:,}); bitsandbytes' CUDA int8 matmul fails on "
            "them once a batch has 64-96 rows ('cublasLt ran into an error', benchmarks/results/bnb_int8_shapes_h200.md); "
            f"{_INT8_FIX.get(c, f'keep it: --bits {c}=16')}"
            for c, layers in misfits.items()]


def check_library(fmt: str) -> None:
    """The format's library is installed and this transformers can reload what it writes."""
    if fmt == "none":
        return
    for library in (_LIBRARY[fmt], *(("compressed_tensors",) if fmt == "autoround" else ())):
        if importlib.util.find_spec(library) is None:
            raise ModelError(f"quantize: {fmt} needs {library}, which is not installed; pip install '{_EXTRA[library]}' "
                             "(or quantize: none)")
    if fmt == "hqq" and Version(transformers.__version__) >= Version("5"):
        raise ModelError(
            f"quantize: hqq needs transformers 4.5x; transformers {transformers.__version__} cannot write or reload HQQ "
            "checkpoints; use transformers 4.57 for this export, or quantize: int8 / nf4"
        )


def _quantized_components(chosen: Mapping[str, int]) -> list[str]:
    return [c for c in arch.QUANTIZABLE_COMPONENTS + ("decoder_layers",) if chosen.get(c, KEEP) != KEEP]


def _kept_components(chosen: Mapping[str, int]) -> list[str]:
    return [c for c in arch.QUANTIZABLE_COMPONENTS if chosen.get(c, KEEP) == KEEP]


def library_config(fmt: str, chosen: Mapping[str, int], model: torch.nn.Module, dtype: torch.dtype,
                   *, double_quant: bool = True, group_size: int = 64) -> Any:
    """The bitsandbytes config (nf4, int8) that stores `chosen` bits per component; hqq: hqq_quantize."""
    if fmt == "nf4":
        q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                                            bnb_4bit_use_double_quant=double_quant)
    elif fmt == "int8":
        q = transformers.BitsAndBytesConfig(load_in_8bit=True)
    else:
        raise ModelError(f"quantize: {fmt!r} has no library config; use one of {', '.join(FORMATS[1:])}")
    if chosen.get("decoder_layers", KEEP) == KEEP:
        raise ModelError(f"bits: decoder_layers=16 with quantize {fmt}: bitsandbytes always quantizes the decoder; use quantize hqq or none")
    q.llm_int8_skip_modules = arch.quantization_skip_patterns(_kept_components(chosen))
    return q


def hqq_quantize(model: torch.nn.Module, chosen: Mapping[str, int], group_size: int, dtype: torch.dtype) -> None:
    """Replace every nn.Linear of a quantized component by hqq's HQQLinear with that component's
    bits, in place, and record the config that transformers' HQQ loader reloads it with.

    Done module by module with hqq itself: transformers 4.57's HqqConfig keys per-layer bits by
    the last two name parts, which the audio tower and the decoder share (self_attn.q_proj); the
    saved tensors carry each layer's own bits, so plain from_pretrained reloads any mix.
    """
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    kept: list[str] = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, torch.nn.Linear):
            continue
        bits = chosen.get(arch.component_of(name + ".weight"), KEEP)
        if bits == KEEP:
            kept.append(name)
            continue
        parent, _, child = name.rpartition(".")
        layer = HQQLinear(module, BaseQuantizeConfig(nbits=bits, group_size=group_size), compute_dtype=dtype,
                          device=str(module.weight.device), del_orig=True)
        if isinstance(layer.bias, torch.Tensor) and not isinstance(layer.bias, torch.nn.Parameter):
            layer.bias = torch.nn.Parameter(layer.bias, requires_grad=False)
        setattr(model.get_submodule(parent) if parent else model, child, layer)
    base = {c: b for c, b in chosen.items() if b != KEEP}
    q = transformers.HqqConfig(nbits=max(base.values(), default=4), group_size=group_size, skip_modules=kept)
    model.config.quantization_config = q
    model.is_hqq_quantized = model.is_hqq_serializable = True


def hqq_compute_as_reloaded(model: torch.nn.Module) -> None:
    """After the HQQ export is saved: make the model in memory compute as its reload does.

    transformers 4.57's HQQ loader computes in float32 whatever dtype is asked (scales and zeros
    as saved, dequantized weights and the other tensors in float32), while hqq_quantize built
    the layers with the export dtype. On a CPU with native bf16 matmuls (AVX512-BF16 / AMX) the two
    decode differently (the reload check caught it: 2 of 8 tokens agreed on the tiny model), so
    the model we keep, check and report is the one a user gets back from `from_pretrained`."""
    model.float()  # floating parameters and buffers; HQQ's packed integer weights are left as they are
    for module in model.modules():
        if type(module).__name__ == "HQQLinear":
            module.compute_dtype = torch.float32
            module.meta["compute_dtype"] = torch.float32
            for key in ("meta_zero", "meta_scale"):
                if isinstance(module.meta.get(key), dict):
                    module.meta[key]["compute_dtype"] = torch.float32


def describe_bits(fmt: str, chosen: Mapping[str, int], dtype: str, group_size: int) -> dict[str, Any]:
    """Per-component precision, for the manifest and the model card."""
    def label(c: str) -> str:
        b = chosen[c]
        if b == KEEP:
            return dtype
        return {"nf4": "NF4 (bitsandbytes)", "int8": "int8 (bitsandbytes LLM.int8)",
                "autoround": f"{b}-bit AutoRound (compressed-tensors), group {group_size}"}.get(fmt, f"{b}-bit HQQ, group {group_size}")

    return {"format": fmt, "bits": dict(chosen), "stored_as": {c: label(c) for c in chosen}}
