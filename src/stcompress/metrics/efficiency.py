"""What compression buys: true parameter counts, bytes on disk, speed and peak GPU memory.

The paper's "4.95B / 4.12B parameters" were element counts of packed 4-bit tensors; the real
counts are 8.40B and 6.78B. `count_parameters` counts weights, not storage elements.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import torch

from stcompress.errors import ModelError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
# Trainer / optimizer state that shares the weight suffixes but holds no model weights.
_NOT_WEIGHTS = re.compile(r"^(training_args\.bin|optimizer\.pt|scheduler\.pt|scaler\.pt|rng_state.*\.pth)$")


def _weights_in(param: torch.Tensor) -> int:
    """How many weights one parameter holds; packed 4-bit tensors store two per byte."""
    if getattr(param, "bnb_quantized", True):
        quant_state = getattr(param, "quant_state", None)
        shape = getattr(quant_state, "shape", None)
        if shape is not None:
            return int(torch.Size(shape).numel())
        if type(param).__name__ == "Params4bit" and getattr(param, "bnb_quantized", False):
            # Quantized without a recorded shape: every storage byte holds two 4-bit weights.
            return param.numel() * param.element_size() * 2
    return param.numel()


def count_parameters(model: torch.nn.Module, *, trainable_only: bool = False) -> int:
    """True number of weights (shared tensors once), 4-bit bitsandbytes models included."""
    params = model.parameters()
    return sum(_weights_in(p) for p in params if p.requires_grad or not trainable_only)


def weight_files(model_dir: str | Path) -> list[Path]:
    """Weight files (and their shard indexes) directly inside a model directory."""
    root = Path(model_dir)
    if not root.is_dir():
        raise ModelError(f"{root}: not a directory; give the model output directory")
    files = []
    for path in sorted(root.iterdir()):
        if not path.is_file() or _NOT_WEIGHTS.match(path.name):
            continue
        if path.name.endswith(WEIGHT_SUFFIXES) or path.name.endswith(".index.json"):
            files.append(path)
    return files


def weight_bytes(model_dir: str | Path) -> int:
    """Bytes on disk of a model's weights: the number the IWSLT track bins and ranks by."""
    files = weight_files(model_dir)
    if not files:
        suffixes = ", ".join(f"*{s}" for s in WEIGHT_SUFFIXES)
        raise ModelError(f"{model_dir}: no weight files ({suffixes}); point at a saved model directory")
    return sum(path.stat().st_size for path in files)


def _cuda_device(device: str | torch.device | None) -> torch.device | None:
    """The CUDA device to watch, or None when there is no GPU to measure."""
    if not torch.cuda.is_available():
        return None
    if device is None:
        return torch.device("cuda", torch.cuda.current_device())
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


class Stopwatch:
    """Wall time and peak GPU memory of a block; CUDA work is synchronised so timings are real.

    with Stopwatch(device) as sw: ...
    sw.seconds, sw.peak_gpu_bytes  # peak is None without CUDA
    """

    def __init__(self, device: str | torch.device | None = None):
        self.device = _cuda_device(device)
        self.seconds: float = 0.0
        self.peak_gpu_bytes: int | None = None
        self._start: float | None = None

    def __enter__(self) -> Stopwatch:
        if self.device is not None:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device is not None:
            torch.cuda.synchronize(self.device)
            self.peak_gpu_bytes = int(torch.cuda.max_memory_allocated(self.device))
        self.seconds = time.perf_counter() - (self._start or 0.0)

    def report(self, n_segments: int, n_generated_tokens: int | None = None) -> dict[str, Any]:
        return speed_report(self.seconds, n_segments, n_generated_tokens, self.peak_gpu_bytes)


def _rate(count: int | None, seconds: float) -> float | None:
    return count / seconds if count is not None and seconds > 0 else None


def speed_report(
    seconds: float,
    n_segments: int,
    n_generated_tokens: int | None = None,
    peak_gpu_bytes: int | None = None,
) -> dict[str, Any]:
    """JSON-ready speed numbers; rates are None where they cannot be computed."""
    return {
        "seconds": seconds,
        "segments": n_segments,
        "generated_tokens": n_generated_tokens,
        "segments_per_s": _rate(n_segments, seconds),
        "tokens_per_s": _rate(n_generated_tokens, seconds),
        "peak_gpu_bytes": peak_gpu_bytes,
        "peak_gpu_gib": peak_gpu_bytes / 2**30 if peak_gpu_bytes is not None else None,
    }


# ---------------------------------------------------------------------------------------------
# Bytes on disk per component, from safetensors headers (nothing is loaded)

_DTYPE_BYTES = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1,
}


def safetensors_header(path: str | Path) -> dict[str, dict[str, Any]]:
    """The tensor table of one .safetensors file: name -> {"dtype", "shape", "data_offsets"}."""
    import json
    import struct

    path = Path(path)
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise ModelError(f"{path}: not a safetensors file (shorter than its 8-byte header length); save the model again")
        (length,) = struct.unpack("<Q", raw)
        if length > path.stat().st_size:
            raise ModelError(f"{path}: corrupt safetensors header (length {length}); save the model again")
        header = json.loads(fh.read(length))
    header.pop("__metadata__", None)
    return header


def tensor_bytes(entry: dict[str, Any]) -> int:
    """dtype size x number of elements of one header entry."""
    numel = 1
    for dim in entry["shape"]:
        numel *= int(dim)
    try:
        return _DTYPE_BYTES[entry["dtype"]] * numel
    except KeyError:
        raise ModelError(f"safetensors dtype {entry['dtype']!r}: unknown to stcompress; report it") from None


def component_bytes(model_dir: str | Path) -> dict[str, Any]:
    """Bytes on disk per model component (stcompress.model.arch.COMPONENTS) and per dtype.

    Tensor bytes come from the safetensors headers (dtype x shape); "overhead" holds the headers
    themselves and any shard index, so the components plus overhead sum to `weight_bytes`.
    """
    from stcompress.model.arch import COMPONENTS, component_of

    files = weight_files(model_dir)
    tensors = [f for f in files if f.name.endswith(".safetensors")]
    others = [f for f in files if f not in tensors and not f.name.endswith(".safetensors.index.json")]
    if not tensors or others:
        raise ModelError(
            f"{model_dir}: per-component sizes need safetensors weights only "
            f"(found {', '.join(f.name for f in others) or 'none'}); save with safe_serialization=True"
        )
    by_component = dict.fromkeys(COMPONENTS, 0)
    by_dtype: dict[str, dict[str, int]] = {c: {} for c in COMPONENTS}
    tensor_total = 0
    for path in tensors:
        for name, entry in safetensors_header(path).items():
            size = tensor_bytes(entry)
            component = component_of(name)
            by_component[component] += size
            by_dtype[component][entry["dtype"]] = by_dtype[component].get(entry["dtype"], 0) + size
            tensor_total += size
    total = weight_bytes(model_dir)
    return {
        "total": total,
        "components": {**by_component, "overhead": total - tensor_total},
        "dtypes": {c: d for c, d in by_dtype.items() if d},
    }
