"""Training items: one (audio, target text) pair each, from references or from distilled data.

An example with three references gives three items. A `stcompress distill` output gives one item
per row of its examples.jsonl (`stcompress.data.distilled` pairs each row with its audio).
Mixing repeats each source by a factor (the paper's Model B trains on 10x KD data).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stcompress.data.distilled import load_distilled
from stcompress.data.example import Example
from stcompress.errors import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class TrainItem:
    """One training pair: an example's audio and ONE target text."""

    id: str  # "<example id>#<reference index>", or "<example id>@kd<row>" for distilled rows
    example: Example
    target: str
    origin: str  # "reference" or "distilled"


def reference_items(examples: list[Example]) -> list[TrainItem]:
    """Each reference of each example is its own item (blank references were dropped on load)."""
    return [
        TrainItem(id=f"{ex.id}#{k}", example=ex, target=ref.strip(), origin="reference")
        for ex in examples
        for k, ref in enumerate(ex.references)
        if ref.strip()
    ]


def distilled_items(directory: str | Path, *, on_error: str = "fail") -> list[TrainItem]:
    """One item per examples.jsonl row of a `stcompress distill` output (`data.distilled` reads it)."""
    pairs = load_distilled(directory, on_error=on_error)
    return [
        TrainItem(id=f"{ex.id}@kd{k}", example=ex, target=target.strip(), origin="distilled")
        for k, (ex, target) in enumerate(pairs)
        if target.strip()
    ]


def repeat_items(items: list[TrainItem], factor: float, seed: int = 0) -> list[TrainItem]:
    """floor(factor) full copies plus a seeded random round(frac * n) of the items (original order kept)."""
    if factor < 0:
        raise DataError(f"repeat: {factor} is negative; use 0 (leave the source out) or more")
    whole = int(factor)
    extra = round((factor - whole) * len(items))
    picked = sorted(np.random.default_rng(seed).choice(len(items), size=extra, replace=False).tolist()) if extra else []
    return [*items * whole, *(items[i] for i in picked)]
