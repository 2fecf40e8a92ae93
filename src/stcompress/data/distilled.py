"""Reading a `stcompress distill` output back: KD targets paired with their examples' audio.

examples.jsonl stores text only ({"id", "source_id", "target", "origin"}); the audio is reloaded
from the dataset the teacher translated, through the `data` section of the distill manifest, so
the KD set and the original data cannot drift apart silently (a changed dataset is reported).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from stcompress.artifacts import read_jsonl, read_manifest
from stcompress.config import DataConfig, load_config
from stcompress.data.example import Example
from stcompress.data.sources import load_examples, resolve_format
from stcompress.errors import DataError, StcompressError

log = logging.getLogger(__name__)

EXAMPLES = "examples.jsonl"


def read_distilled(directory: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(rows of examples.jsonl, manifest) of a finished distill output; no audio is read."""
    directory = Path(directory)
    try:
        manifest = read_manifest(directory)
    except StcompressError as exc:
        raise DataError(str(exc)) from None
    if manifest.get("stage") != "distill":
        raise DataError(f"{directory}: a {manifest.get('stage')!r} output, not a distill output; run stcompress distill")
    path = directory / EXAMPLES
    if not path.is_file():
        raise DataError(f"{path}: missing from the distill output; run stcompress distill again")
    rows = read_jsonl(path)
    for n, row in enumerate(rows, 1):
        if not all(k in row for k in ("id", "source_id", "target", "origin")):
            raise DataError(f"{path}: line {n} lacks id, source_id, target or origin; regenerate it with stcompress distill")
    return rows, manifest


def distilled_texts(directory: str | Path) -> list[str]:
    """The KD targets (examples.jsonl) and every raw teacher output (hypotheses.jsonl, filtered
    ones included) of a distill output, without reading audio: what `export --trim-vocab` keeps."""
    directory = Path(directory)
    rows, _ = read_distilled(directory)
    texts = [r["target"] for r in rows]
    if (directory / "hypotheses.jsonl").is_file():
        texts += [r["hypothesis"] for r in read_jsonl(directory / "hypotheses.jsonl") if r.get("hypothesis")]
    return texts


def distill_data_config(manifest: dict[str, Any], directory: Path) -> DataConfig:
    """The DataConfig the teacher translated; a relative dataset path that no longer resolves
    from here falls back to the absolute path recorded among the manifest's inputs."""
    cfg = load_config(DataConfig, manifest["config"]["data"])
    kind = resolve_format(cfg)
    if kind in ("jsonl", "tsv") and not Path(cfg.dataset).expanduser().exists():
        recorded = (manifest.get("inputs", {}).get("data") or {}).get("path")
        if recorded and Path(recorded).is_file():
            cfg = dataclasses.replace(cfg, dataset=recorded)
    return cfg


def _check_identity(manifest: dict[str, Any], cfg: DataConfig, directory: Path) -> None:
    from stcompress.stages.translate import data_identity

    recorded = manifest.get("inputs", {}).get("data") or {}
    now = data_identity(cfg)
    if "sha256" in recorded and recorded.get("sha256") != now.get("sha256"):
        log.warning("%s: the dataset changed since it was distilled (%s); KD targets may not match the audio",
                    directory, recorded.get("path"))


def load_distilled(directory: str | Path, *, on_error: str = "fail") -> list[tuple[Example, str]]:
    """The KD set as (example with audio, target text) pairs, in examples.jsonl order.

    One example may appear several times (its reference, the teacher's output, upsampled copies);
    the Example object (and its audio) is shared between them. Rows whose audio cannot be loaded
    raise under on_error="fail" and are left out with a warning under "skip".
    """
    directory = Path(directory)
    rows, manifest = read_distilled(directory)
    cfg = distill_data_config(manifest, directory)
    _check_identity(manifest, cfg, directory)
    needed = {r["source_id"] for r in rows}
    loaded = load_examples(cfg, on_error=on_error)
    by_id = {ex.id: ex for ex in loaded.examples if ex.id in needed}
    missing = sorted(needed - by_id.keys() - {s.id for s in loaded.skipped})
    if missing:
        shown = ", ".join(map(repr, missing[:5])) + (" ..." if len(missing) > 5 else "")
        raise DataError(
            f"{directory}: {len(missing)} distilled examples are not in {cfg.dataset} ({shown}); "
            "the dataset or its split changed, run stcompress distill again"
        )
    pairs = [(by_id[r["source_id"]], r["target"]) for r in rows if r["source_id"] in by_id]
    if len(pairs) < len(rows):
        log.warning("%s: %d of %d KD rows left out (their audio was skipped)", directory, len(rows) - len(pairs), len(rows))
    return pairs
