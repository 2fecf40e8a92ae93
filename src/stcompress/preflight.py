"""Every input a stage config names (models, datasets, stage outputs), checked before anything loads.

One rule tells a hub id from a local path: a hub id is `org/name` (one slash, no file suffix of a
manifest) that does not exist here; anything else is local, and a local path that does not exist
fails at once, naming the option that gave it (instead of a minute of hub retries that end up
blaming another option). `stcompress <stage>` runs these checks first; `stcompress run` runs them
for every stage before the first one starts (and in `--dry-run`), reporting all problems at once.
Deeper checks (a model directory's files, a manifest's rows) stay with the code that reads them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from stcompress.config import BUILTIN_MODELS, model_required

DATA_SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".tsv": "tsv"}
ACCEPTED_DATA = "a .jsonl / .json manifest, a .tsv manifest, a saved HF dataset folder, 'builtin', or a hub id (org/name)"
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
_FILE_SUFFIXES = {*DATA_SUFFIXES, ".txt", ".csv", ".yaml", ".yml", ".wav", ".flac", ".safetensors", ".bin", ".parquet"}


def is_hub_id(value: str) -> bool:
    """`org/name` that is not a local path (and does not end like a file)."""
    return (bool(_HUB_ID.fullmatch(value)) and not Path(value).expanduser().exists()
            and Path(value).suffix.lower() not in _FILE_SUFFIXES)


def dataset_problem(item: str, value: str, fmt: str = "auto") -> str | None:
    """Why `value` cannot be a dataset (None: it can, as far as can be told without loading it)."""
    from stcompress.data.sources import BUILTIN_DATASETS

    if value == "builtin" or value.startswith("builtin:") or fmt == "builtin":
        name = value if value.startswith("builtin") else "builtin"
        return None if name in BUILTIN_DATASETS else (
            f"{item}: unknown built-in dataset {name!r}; use one of {', '.join(BUILTIN_DATASETS)}")
    path = Path(value).expanduser()
    if path.is_file():
        if fmt in ("jsonl", "tsv") or path.suffix.lower() in DATA_SUFFIXES:
            return None
        return (f"{item}: {value} is a file of unknown format ({path.suffix or 'no suffix'}); give {ACCEPTED_DATA}, "
                f"or name its format with --{item.rsplit('.', 1)[0].replace('_', '-')}.format jsonl|tsv")
    if path.is_dir() or is_hub_id(value):
        return None
    return f"{item}: {value} does not exist; give {ACCEPTED_DATA}"


def model_problem(item: str, value: str) -> str | None:
    """Why `value` cannot be a model (a directory, stcompress output, builtin: name or hub id)."""
    if value.startswith("builtin:"):
        return None if value in BUILTIN_MODELS else f"{item}: unknown built-in model {value}; use one of {', '.join(BUILTIN_MODELS)}"
    if Path(value).expanduser().exists() or is_hub_id(value):
        return None
    return (f"{item}: {value} does not exist; give a model directory (or a stcompress output), a hub id "
            f"such as Qwen/Qwen2-Audio-7B-Instruct, or one of {', '.join(BUILTIN_MODELS)}")


def output_problem(item: str, value: str, what: str) -> str | None:
    """A stcompress output (or file) the stage reads: it must exist here."""
    return None if Path(value).expanduser().exists() else f"{item}: {value} does not exist; give {what}"


def inputs(cfg: Any) -> Iterator[tuple[str, str, Callable[[str, str], str | None]]]:
    """(option, value, check) of every input `cfg` names."""
    if model_required(cfg) and cfg.model.path:
        yield "model.path", cfg.model.path, model_problem
    data = getattr(cfg, "data", None)
    if data is not None and not getattr(cfg, "datasets", ()):
        yield "data.dataset", data.dataset, lambda item, v: dataset_problem(item, v, data.format)
    for i, mix in enumerate(getattr(cfg, "datasets", ())):
        if mix.distilled:
            yield f"datasets[{i}].distilled", mix.distilled, lambda item, v: output_problem(item, v, "a distill output")
        else:
            yield f"datasets[{i}].data.dataset", mix.data.dataset, lambda item, v, f=mix.data.format: dataset_problem(item, v, f)
    vocab = getattr(cfg, "vocab", None)
    if vocab is not None and getattr(cfg, "trim_vocab", False):  # export --trim-vocab's text sources
        for i, mix in enumerate(vocab.datasets):
            if mix.distilled:
                yield f"vocab.datasets[{i}].distilled", mix.distilled, lambda item, v: output_problem(item, v, "a distill output")
            else:
                yield (f"vocab.datasets[{i}].data.dataset", mix.data.dataset,
                       lambda item, v, f=mix.data.format: dataset_problem(item, v, f))
        for value in vocab.distilled:
            yield "vocab.distilled", value, lambda item, v: output_problem(item, v, "a distill output")
        for value in vocab.references:
            yield "vocab.references", value, dataset_problem
    dev = getattr(cfg, "dev", None)
    if dev is not None and dev.dataset not in ("auto", "none"):
        yield "dev.dataset", dev.dataset, dataset_problem
    kd = getattr(cfg, "kd", None)
    if kd is not None and kd.teacher and kd.ratio > 0:
        yield "kd.teacher", kd.teacher, model_problem
    named = {
        "hypotheses": (output_problem, "a hypotheses.jsonl or a translate output"),
        "importance": (output_problem, "an importance output directory"),
        "scores": (output_problem, "an evaluate output or its scores.json"),
        "run_dir": (output_problem, "a `stcompress run` directory"),
        "input": (model_problem, None),
        "base_model": (model_problem, None),
    }
    for name, (check, what) in named.items():
        value = getattr(cfg, name, None)
        if name == "run_dir" and type(cfg).__name__ != "ReportConfig":
            continue  # the demo's run_dir is its output
        if isinstance(value, str) and value:
            yield name, value, (check if what is None else lambda item, v, w=what: output_problem(item, v, w))


def check_inputs(cfg: Any, made_later: Callable[[str], bool] | None = None) -> list[str]:
    """Every problem with the inputs `cfg` names; `made_later(value)`: produced by an earlier stage
    of the same run (so it need not exist yet)."""
    problems = []
    for item, value, check in inputs(cfg):
        if made_later is not None and made_later(value):
            continue
        problem = check(item, value)
        if problem:
            problems.append(problem)
    return problems
