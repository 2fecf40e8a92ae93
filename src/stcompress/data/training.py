"""Training items: one (audio, target text) pair each, from references or from distilled data.

An example with three references gives three items. A `stcompress distill` output gives one item
per row of its examples.jsonl ({id, source_id, target, origin}); the audio comes from the data
section recorded in its manifest, so the KD data never copies audio. Mixing repeats each source
by a factor (the paper's Model B trains on 10x KD data).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stcompress.artifacts import read_jsonl, read_manifest
from stcompress.data.example import Example, LoadResult
from stcompress.data.sources import load_examples
from stcompress.errors import ConfigError, DataError

log = logging.getLogger(__name__)

DISTILLED_EXAMPLES = "examples.jsonl"


@dataclass(frozen=True, eq=False)
class TrainItem:
    """One training pair: an example's audio and ONE target text."""

    id: str  # unique within a source: "<example id>#<reference index>" or the distilled row id
    example: Example
    target: str
    origin: str  # "reference", or the distilled row's origin (e.g. "teacher")


def reference_items(examples: list[Example]) -> list[TrainItem]:
    """Each reference of each example is its own item (blank references were dropped on load)."""
    return [
        TrainItem(id=f"{ex.id}#{k}", example=ex, target=ref.strip(), origin="reference")
        for ex in examples
        for k, ref in enumerate(ex.references)
        if ref.strip()
    ]


def load_distilled(directory: str | Path, *, on_error: str = "fail") -> tuple[list[TrainItem], LoadResult, dict[str, Any]]:
    """Items of a `stcompress distill` output: (items, the audio LoadResult, its manifest)."""
    from stcompress.config import DataConfig, load_config

    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest.get("stage") != "distill":
        raise DataError(f"{directory}: a {manifest.get('stage')!r} output, not a distill output; point datasets[].distilled at "
                        "the directory `stcompress distill` wrote")
    rows_path = directory / DISTILLED_EXAMPLES
    if not rows_path.is_file():
        raise DataError(f"{directory}: no {DISTILLED_EXAMPLES}; the distill output is incomplete, run stcompress distill again")
    rows = read_jsonl(rows_path)
    bad = [n for n, r in enumerate(rows, 1) if not all(isinstance(r.get(k), str) for k in ("id", "source_id", "target"))]
    if bad:
        raise DataError(f"{rows_path}: line {bad[0]} lacks a string id, source_id or target ({len(bad)} such lines); "
                        "regenerate it with stcompress distill")
    try:
        data_cfg = load_config(DataConfig, manifest.get("config", {}).get("data") or {})
    except ConfigError as exc:
        raise DataError(f"{directory}: its manifest's config.data is not a valid data section ({exc}); rerun stcompress distill") from None
    loaded = load_examples(data_cfg, on_error=on_error)
    by_id = {ex.id: ex for ex in loaded.examples}
    skipped = {s.id for s in loaded.skipped}
    missing = [r["source_id"] for r in rows if r["source_id"] not in by_id and r["source_id"] not in skipped]
    if missing:
        raise DataError(f"{directory}: {len(missing)} rows name source examples that {data_cfg.dataset} does not have "
                        f"(first: {missing[0]!r}); the dataset changed since distillation, rerun stcompress distill")
    items = [
        TrainItem(id=r["id"], example=by_id[r["source_id"]], target=r["target"].strip(), origin=str(r.get("origin", "distilled")))
        for r in rows
        if r["source_id"] in by_id and r["target"].strip()
    ]
    return items, loaded, manifest


def repeat_items(items: list[TrainItem], factor: float, seed: int = 0) -> list[TrainItem]:
    """floor(factor) full copies plus a seeded random round(frac * n) of the items (original order kept)."""
    if factor < 0:
        raise DataError(f"repeat: {factor} is negative; use 0 (leave the source out) or more")
    whole = int(factor)
    extra = round((factor - whole) * len(items))
    picked = sorted(np.random.default_rng(seed).choice(len(items), size=extra, replace=False).tolist()) if extra else []
    return [*items * whole, *(items[i] for i in picked)]
