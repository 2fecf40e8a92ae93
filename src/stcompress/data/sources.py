"""Where examples come from: the built-in demo, local manifests (JSONL / TSV), HF datasets.

Every source is first turned into a small column view (`Table`), so the row logic (columns,
ids, the paper's split, limit, per-item errors, the over-length count) exists once.
Audio is decoded only for the rows that survive the split and the limit.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from stcompress.config import DataConfig
from stcompress.data.audio import decode_audio_bytes, load_audio, to_mono_16k
from stcompress.data.example import Example, LoadResult, Skipped
from stcompress.data.splits import select_subset
from stcompress.errors import DataError, StcompressError
from stcompress.languages import check_language

logger = logging.getLogger(__name__)

ON_ERROR = ("fail", "skip")
_DATA_DIR = Path(__file__).resolve().parent
# Datasets shipped with stcompress: the 12-clip example, and the demo's task (synthesised English
# speech of 120 short sentences, German / Chinese references; see data/demo/README.md).
BUILTIN_DATASETS = {
    "builtin": _DATA_DIR / "builtin" / "manifest.jsonl",
    "builtin:demo-train": _DATA_DIR / "demo" / "train.jsonl",
    "builtin:demo-dev": _DATA_DIR / "demo" / "dev.jsonl",
    "builtin:demo-kd": _DATA_DIR / "demo" / "kd.jsonl",
    "builtin:demo-test": _DATA_DIR / "demo" / "test.jsonl",
}


def builtin_manifest_path(name: str = "builtin") -> Path:
    """The manifest of a dataset shipped with stcompress (English speech, de/zh refs)."""
    if name not in BUILTIN_DATASETS:
        raise DataError(f"data.dataset: unknown built-in dataset {name!r}; use one of {', '.join(BUILTIN_DATASETS)}")
    return BUILTIN_DATASETS[name]


def load_examples(cfg: DataConfig, *, on_error: str = "fail", require_references: bool = False) -> LoadResult:
    """Load the examples `cfg` describes: its split part, then its limit, audio as 16 kHz mono.

    Per-item problems (bad audio, a missing reference when `require_references`) raise under
    on_error="fail" and are listed in `LoadResult.skipped` under "skip"; dataset-level problems
    (unknown column, no rows, duplicate ids, unknown language) always raise.
    """
    _check_options(cfg, on_error)
    return build_examples(_table(cfg), cfg, on_error=on_error, require_references=require_references)


def _table(cfg: DataConfig) -> Table:
    kind = resolve_format(cfg)
    if kind == "hf":
        return hf_table(load_hf_dataset(cfg.dataset, cfg.hf_config, cfg.split), cfg, name=cfg.dataset)
    path = builtin_manifest_path(cfg.dataset) if kind == "builtin" else Path(cfg.dataset).expanduser()
    return read_manifest(path, "tsv" if kind == "tsv" else "jsonl", name=cfg.dataset if kind == "builtin" else None)


def reference_texts(cfg: DataConfig) -> list[str]:
    """Every reference of the examples `cfg` selects (split part, limit), without reading audio:
    the texts `export --trim-vocab` keeps the tokens of."""
    _check_options(cfg, "fail")
    table = _table(cfg)
    if table.n_rows == 0:
        raise DataError(f"{table.name}: the dataset has no rows; check the file or the split name (data.split)")
    cols = _resolve_columns(table, cfg, require_references=True)
    indices = select_subset(table.n_rows, cfg.subset, cfg.test_size, cfg.dev_size, cfg.split_seed)
    values = table.values(cols.reference)
    return [ref for i in indices[: cfg.limit] for ref in _references(values[i], cols.reference)]


def resolve_format(cfg: DataConfig) -> str:
    """With format "auto", pick by name: builtin, *.jsonl / *.json, *.tsv, else a HF dataset."""
    if cfg.format != "auto":
        return cfg.format
    if cfg.dataset == "builtin" or cfg.dataset.startswith("builtin:"):
        return "builtin"
    from stcompress.preflight import DATA_SUFFIXES, dataset_problem

    problem = dataset_problem("data.dataset", cfg.dataset)
    if problem:  # an existing file of another format, or a local path that is not there
        raise DataError(problem)
    return DATA_SUFFIXES.get(Path(cfg.dataset).suffix.lower(), "hf")


# ---------------------------------------------------------------------------------------------
# The shared row logic


@dataclass
class Table:
    """A column view of one source. `values` is for text columns; `cell` reads one audio cell."""

    name: str
    columns: list[str]
    n_rows: int
    values: Callable[[str], list[Any]]
    cell: Callable[[int, str], Any]
    base_dir: Path | None = None  # relative audio paths resolve against this (the manifest's folder)


@dataclass(frozen=True)
class _Columns:
    audio: str
    id: str | None
    source: str | None  # None: the data has no transcript column
    reference: str | None  # None: the data has no reference column (and none was required)


def build_examples(table: Table, cfg: DataConfig, *, on_error: str = "fail", require_references: bool = False) -> LoadResult:
    """Columns -> ids -> split -> limit -> decoded examples, following `on_error` per item."""
    _check_options(cfg, on_error)
    if table.n_rows == 0:
        raise DataError(f"{table.name}: the dataset has no rows; check the file or the split name (data.split)")
    cols = _resolve_columns(table, cfg, require_references)
    ids = _ids(table, cols.id)
    indices = select_subset(table.n_rows, cfg.subset, cfg.test_size, cfg.dev_size, cfg.split_seed)
    if cfg.limit is not None:
        indices = indices[: cfg.limit]
    sources = table.values(cols.source) if cols.source else None
    references = table.values(cols.reference) if cols.reference else None
    result = LoadResult(examples=[], skipped=[], n_over_max=0)

    def decode(i: int) -> Example | DataError:
        try:
            return _example(table, cols, i, ids[i], cfg.target_lang, sources, references, require_references)
        except DataError as exc:
            return exc

    # Decoding (libsndfile, numpy, scipy) releases the GIL: threads cut the load of thousands of
    # clips several-fold on a many-core GPU machine; results and errors keep the dataset's order.
    with ThreadPoolExecutor(max_workers=_decode_workers(len(indices))) as pool:
        decoded = list(pool.map(decode, indices))
    for i, item in zip(indices, decoded):
        try:
            if isinstance(item, DataError):
                raise item
            result.examples.append(item)
        except DataError as exc:
            if on_error == "fail":
                raise DataError(f"item {ids[i]!r}: {exc} (or pass --on-error skip to leave such items out)") from None
            logger.warning("skipping item %r: %s", ids[i], exc)
            result.skipped.append(Skipped(id=ids[i], reason=str(exc)))
    result.n_over_max = sum(ex.duration > cfg.max_audio_seconds for ex in result.examples)
    if result.n_over_max:
        logger.warning(
            "%d of %d clips are longer than %g s; Qwen2-Audio's feature extractor only hears the first 30 s "
            "(segment long recordings first)", result.n_over_max, len(result.examples), cfg.max_audio_seconds,
        )
    return result


def _decode_workers(n: int) -> int:
    return max(1, min(8, os.cpu_count() or 1, n // 16))


def _check_options(cfg: DataConfig, on_error: str) -> None:
    if on_error not in ON_ERROR:
        raise DataError(f"on_error: unknown value {on_error!r}; use one of {', '.join(ON_ERROR)}")
    try:
        check_language(cfg.target_lang, item="data.target_lang")
    except StcompressError as exc:
        raise DataError(str(exc)) from None


def _resolve_columns(table: Table, cfg: DataConfig, require_references: bool) -> _Columns:
    """Check every mapped column at once; optional ones (source, default reference) may be absent."""
    reference = cfg.reference_column or f"text_{cfg.target_lang}"
    wanted = {"data.audio_column": cfg.audio_column}
    if cfg.id_column:
        wanted["data.id_column"] = cfg.id_column
    if cfg.reference_column or require_references:
        wanted["data.reference_column"] = reference
    missing = [f"{col!r} ({key})" for key, col in wanted.items() if col not in table.columns]
    if missing:
        raise DataError(
            f"{table.name}: no column {', '.join(missing)}; available columns: {', '.join(table.columns) or 'none'}; "
            "set those options to one of them"
        )
    source = cfg.source_column if cfg.source_column in table.columns else None
    if cfg.source_column and source is None:
        logger.info("%s: no source column %r; examples carry no English transcript", table.name, cfg.source_column)
    if reference not in table.columns:
        logger.info("%s: no reference column %r; examples carry no references", table.name, reference)
        reference = None
    return _Columns(audio=cfg.audio_column, id=cfg.id_column or ("id" if "id" in table.columns else None), source=source, reference=reference)


def _ids(table: Table, column: str | None) -> list[str]:
    """Ids as strings (row numbers when no id column); empty or duplicate ids are dataset errors."""
    if column is None:
        return [str(i) for i in range(table.n_rows)]
    ids: list[str] = []
    rows: dict[str, list[int]] = defaultdict(list)
    for i, value in enumerate(table.values(column)):
        if value is None or str(value).strip() == "":
            raise DataError(
                f"{table.name}: row {i} has an empty id in column {column!r}; fill it in, "
                "or pass --data.id-column null to use row numbers"
            )
        ids.append(str(value))
        rows[ids[-1]].append(i)
    duplicates = {k: v for k, v in rows.items() if len(v) > 1}
    if duplicates:
        shown = "; ".join(f"{k!r} at rows {', '.join(map(str, v))}" for k, v in list(duplicates.items())[:5])
        raise DataError(
            f"{table.name}: duplicate id {shown} in column {column!r}; make ids unique "
            "or pass --data.id-column null to use row numbers"
        )
    return ids


def _example(table: Table, cols: _Columns, i: int, item_id: str, lang: str,
             sources: list[Any] | None, references: list[Any] | None, require_references: bool) -> Example:
    refs = _references(references[i], cols.reference) if references is not None else ()
    if require_references and not refs:
        raise DataError(f"no reference in column {cols.reference!r}; add the translation or drop the item")
    audio = _decode_cell(table.cell(i, cols.audio), cols.audio, table.base_dir)
    source = sources[i] if sources is not None else None
    source = str(source) if source is not None and str(source).strip() else None
    return Example(id=item_id, audio=audio, target_lang=lang, source=source, references=refs)


def _references(value: Any, column: str | None) -> tuple[str, ...]:
    """A cell holds one reference (string) or several (list of strings); blanks are dropped."""
    if value is None:
        return ()
    items = value if isinstance(value, (list, tuple)) else [value]
    if not all(isinstance(v, str) or v is None for v in items):
        raise DataError(f"the reference in column {column!r} is {type(value).__name__}; write a string or a list of strings")
    return tuple(v for v in items if v is not None and v.strip())


def _decode_cell(cell: Any, column: str, base_dir: Path | None) -> np.ndarray:
    """A path, or an HF audio cell ({bytes, path} undecoded, or {array, sampling_rate})."""
    if isinstance(cell, (str, Path)) and str(cell).strip():
        return load_audio(_resolve(cell, base_dir))
    if isinstance(cell, dict):
        name = str(cell.get("path") or f"audio cell in column {column!r}")
        if cell.get("array") is not None:
            return to_mono_16k(cell["array"], cell.get("sampling_rate"), name=name)
        if cell.get("bytes"):
            return decode_audio_bytes(cell["bytes"], name=name)
        if cell.get("path"):
            return load_audio(_resolve(cell["path"], base_dir))
    if cell is None or isinstance(cell, (str, dict)):
        raise DataError(f"no audio in column {column!r}; give a file path (or drop the item)")
    raise DataError(f"the audio cell in column {column!r} is a {type(cell).__name__}; give a file path or use an HF Audio column")


def _resolve(path: str | Path, base_dir: Path | None) -> Path:
    path = Path(path).expanduser()
    return path if path.is_absolute() or base_dir is None else base_dir / path


# ---------------------------------------------------------------------------------------------
# Local manifests


def read_manifest(path: str | Path, kind: str = "jsonl", *, name: str | None = None) -> Table:
    """A JSONL (or JSON array) / TSV manifest as a Table; audio paths are relative to its folder."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: manifest not found; check data.dataset (a .jsonl/.tsv file, 'builtin' or a HF dataset)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text; save the manifest as UTF-8") from None
    rows = _parse_tsv(path, text) if kind == "tsv" else _parse_jsonl(path, text)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return Table(
        name=name or str(path),
        columns=columns,
        n_rows=len(rows),
        values=lambda col: [row.get(col) for row in rows],
        cell=lambda i, col: rows[i].get(col),
        base_dir=path.parent,
    )


def _parse_jsonl(path: Path, text: str) -> list[dict[str, Any]]:
    if text.lstrip().startswith("["):  # a .json file holding one array of objects
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}); fix the file") from None
        return [_as_row(path, n, item) for n, item in enumerate(items, start=1)]
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg}); write one JSON object per line") from None
        rows.append(_as_row(path, lineno, item))
    return rows


def _as_row(path: Path, where: int, item: Any) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise DataError(f"{path}:{where}: expected a JSON object, got {type(item).__name__}; write one object per example")
    return item


def _parse_tsv(path: Path, text: str) -> list[dict[str, Any]]:
    """Header row, then one row per example; no quoting, so text cells must not contain tabs."""
    reader = csv.reader(text.splitlines(), delimiter="\t", quoting=csv.QUOTE_NONE)
    header = next(reader, None)
    if not header or not any(h.strip() for h in header):
        raise DataError(f"{path}: no header row; start the file with tab-separated column names (e.g. id, audio, text_en)")
    header = [h.strip() for h in header]
    rows = []
    for fields in reader:
        if not any(f.strip() for f in fields):
            continue
        if len(fields) != len(header):
            raise DataError(
                f"{path}:{reader.line_num}: {len(fields)} tab-separated fields but the header has {len(header)}; "
                "fix the row (tabs are not allowed inside text)"
            )
        rows.append({h: (f if f.strip() else None) for h, f in zip(header, fields)})
    return rows


# ---------------------------------------------------------------------------------------------
# Hugging Face datasets


def load_hf_dataset(name: str, hf_config: str | None = None, split: str = "dev+eval") -> Any:
    """`load_dataset(name, hf_config, split=split)`, or `load_from_disk` for a `save_to_disk` folder."""
    datasets = _import_datasets()
    path = Path(name).expanduser()
    try:
        if path.is_dir() and any((path / f).is_file() for f in ("state.json", "dataset_dict.json")):
            loaded = datasets.load_from_disk(str(path))
            return _pick_split(loaded, split, name) if isinstance(loaded, datasets.DatasetDict) else loaded
        return datasets.load_dataset(name, hf_config, split=split)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - datasets raises many types; the user needs one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise DataError(
            f"{name}: cannot load the dataset ({type(exc).__name__}: {first}); check data.dataset, "
            "data.hf_config and data.split, the network, and `hf auth login` for gated datasets"
        ) from None


def _pick_split(dataset_dict: Any, split: str, name: str) -> Any:
    """'dev+eval' on a saved DatasetDict: concatenate the named splits in that order."""
    import datasets

    parts = [p.strip() for p in split.split("+")]
    unknown = [p for p in parts if p not in dataset_dict]
    if unknown:
        raise DataError(
            f"{name}: no split {', '.join(map(repr, unknown))}; available splits: {', '.join(dataset_dict)}; "
            "set data.split (join several with '+')"
        )
    chosen = [dataset_dict[p] for p in parts]
    return chosen[0] if len(chosen) == 1 else datasets.concatenate_datasets(chosen)


def examples_from_hf(dataset: Any, cfg: DataConfig, *, on_error: str = "fail", require_references: bool = False,
                     name: str | None = None) -> LoadResult:
    """Examples from an already loaded `datasets.Dataset` (one split).

    Audio columns are cast to `Audio(decode=False)`: datasets >= 4 would decode with
    torchcodec/FFmpeg; we decode the stored bytes (or file) with soundfile instead.
    """
    return build_examples(hf_table(dataset, cfg, name=name), cfg, on_error=on_error, require_references=require_references)


def hf_table(dataset: Any, cfg: DataConfig, *, name: str | None = None) -> Table:
    datasets = _import_datasets()
    name = name or "dataset"
    if isinstance(dataset, datasets.DatasetDict):
        raise DataError(f"{name}: got several splits ({', '.join(dataset)}); pick one with data.split")
    if isinstance(dataset.features.get(cfg.audio_column), datasets.Audio):
        dataset = dataset.cast_column(cfg.audio_column, datasets.Audio(decode=False))
    return Table(
        name=name,
        columns=list(dataset.column_names),
        n_rows=len(dataset),
        values=lambda col: list(dataset[col]),
        cell=lambda i, col: dataset[i][col],
    )


def _import_datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise DataError(
            "datasets: the Hugging Face `datasets` package is not installed; pip install 'stcompress[hf]'"
        ) from None
    return datasets
