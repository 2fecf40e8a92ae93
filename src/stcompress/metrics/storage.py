"""Bytes on disk the way the IWSLT compression track counts them.

Two measures, both recorded by `stcompress export`: the sum of the model directory's *.safetensors
files (what is shipped), and the size of `torch.save(model.state_dict(), "archive.pt")` for the
model loaded back with plain from_pretrained (what the organisers' scripts write). The second is
counted without writing a file: torch.save streams the same bytes to any writer (a zip archive
whose record names carry the file's stem, so another file name differs by a few bytes per tensor).
"""

from __future__ import annotations

from pathlib import Path

import torch

from stcompress.errors import ModelError


def safetensors_bytes(model_dir: str | Path) -> int:
    """Sum of the *.safetensors files directly in `model_dir` (shard indexes and configs left out)."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ModelError(f"{model_dir}: no *.safetensors files; point at an exported model directory")
    return sum(f.stat().st_size for f in files)


class _Counter:
    """A write-only sink that keeps the byte count only."""

    def __init__(self) -> None:
        self.bytes = 0

    def write(self, data: bytes) -> int:
        n = memoryview(data).nbytes
        self.bytes += n
        return n

    def flush(self) -> None:
        pass


def torch_save_bytes(model: torch.nn.Module) -> int:
    """Bytes `torch.save(model.state_dict(), "archive.pt")` writes (equal to that file's size)."""
    sink = _Counter()
    torch.save(model.state_dict(), sink)
    return sink.bytes
