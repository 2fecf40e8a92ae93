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
