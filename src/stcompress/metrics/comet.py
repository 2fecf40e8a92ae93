"""COMET scores through `unbabel-comet`, an optional extra (`pip install 'stcompress[comet]'`).

The paper reports `Unbabel/wmt20-comet-da`; the IWSLT track ranks by `Unbabel/wmt22-comet-da`.
The source side is the gold English transcript, never an ASR output. The model (about 2 GB) is
loaded on the first `score` call and freed by `close()`, so a stage can release it before loading
the speech model again.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from stcompress.errors import StcompressError
from stcompress.metrics.text import Score

log = logging.getLogger(__name__)

DEFAULT_MODEL = "Unbabel/wmt22-comet-da"  # what the IWSLT 2025 compression track ranks by
PAPER_MODEL = "Unbabel/wmt20-comet-da"  # what Moslem (IWSLT 2025) reports

_INSTALL_FIX = "pip install 'stcompress[comet]'"


def _import_comet() -> Any:
    try:
        import comet
    except ImportError as exc:
        raise StcompressError(
            f"comet: the unbabel-comet package is not installed ({exc}); {_INSTALL_FIX}"
        ) from None
    return comet


def local_checkpoint(name_or_path: str) -> Path | None:
    """The .ckpt file a local path points at, or None for a hub name such as Unbabel/wmt22-comet-da."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        for candidate in (path / "checkpoints" / "model.ckpt", path / "model.ckpt"):
            if candidate.is_file():
                return candidate
        raise StcompressError(
            f"comet.model: {name_or_path} has no checkpoints/model.ckpt; "
            "point at a COMET download directory or its .ckpt file"
        )
    if name_or_path.endswith(".ckpt") or name_or_path.startswith(("/", ".", "~")):
        raise StcompressError(f"comet.model: {name_or_path} does not exist; fix the path or use a hub name")
    return None


def _load_comet_model(name_or_path: str) -> Any:
    """Load a COMET model from a local checkpoint or the Hugging Face hub (the default loader)."""
    comet = _import_comet()
    checkpoint = local_checkpoint(name_or_path)
    if checkpoint is None:
        try:
            checkpoint = comet.download_model(name_or_path)
        except Exception as exc:  # hub, network and auth errors all mean the same to the user
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise StcompressError(
                f"comet.model: cannot download {name_or_path!r} ({first_line}); "
                "check the name and network, or give a local checkpoint path"
            ) from None
    log.info("loading COMET checkpoint %s", checkpoint)
    return comet.load_from_checkpoint(str(checkpoint))


def _comet_version() -> str:
    try:
        return metadata.version("unbabel-comet")
    except metadata.PackageNotFoundError:
        return "unknown"


class CometScorer:
    """System and segment COMET scores (x100) for one model, loaded lazily, freed by `close()`."""

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        batch_size: int = 16,
        gpus: int | None = None,
        *,
        progress_bar: bool = False,
        loader: Callable[[str], Any] | None = None,
    ):
        if batch_size < 1:
            raise StcompressError(f"comet.batch_size: must be at least 1, got {batch_size}; use e.g. 16")
        self.model_name = model
        self.batch_size = batch_size
        self.gpus = (1 if torch.cuda.is_available() else 0) if gpus is None else gpus
        self.progress_bar = progress_bar
        self._loader = loader or _load_comet_model
        self._model: Any = None

    @property
    def loaded(self) -> bool:
        return self._model is not None

    @property
    def signature(self) -> str:
        return f"model:{self.model_name}|src:gold|nrefs:1|scale:100|version:{_comet_version()}"

    def score(
        self, sources: Sequence[str | None], hypotheses: Sequence[str], references: Sequence[Any]
    ) -> Score:
        return self.score_with_segments(sources, hypotheses, references)[0]

    def score_with_segments(
        self, sources: Sequence[str | None], hypotheses: Sequence[str], references: Sequence[Any]
    ) -> tuple[Score, list[float]]:
        """The system score and one score per segment, all x100."""
        samples = _samples(sources, hypotheses, references)
        if self._model is None:
            self._model = self._loader(self.model_name)
        output = self._model.predict(
            samples, batch_size=self.batch_size, gpus=self.gpus, progress_bar=self.progress_bar
        )
        system = Score(name="comet", score=100.0 * float(output.system_score), signature=self.signature)
        return system, [100.0 * float(s) for s in output.scores]

    def close(self) -> None:
        """Free the model (and its GPU memory) so the next stage has room."""
        if self._model is None:
            return
        self._model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def __enter__(self) -> CometScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _single_reference(i: int, refs: Any) -> str:
    if isinstance(refs, str):
        return refs
    refs = [r for r in (refs or []) if r is not None]
    if len(refs) != 1 or not isinstance(refs[0], str):
        raise StcompressError(
            f"references[{i}]: COMET scores against exactly one reference, got {len(refs)}; "
            "pass one reference string per segment"
        )
    return refs[0]


def _samples(
    sources: Sequence[str | None], hypotheses: Sequence[str], references: Sequence[Any]
) -> list[dict[str, str]]:
    """COMET's input rows (src, mt, ref), after checking what a user can get wrong."""
    n = len(hypotheses)
    if n == 0:
        raise StcompressError("hypotheses: the list is empty; translate at least one segment first")
    if len(sources) != n or len(references) != n:
        raise StcompressError(
            f"comet: {len(sources)} sources, {n} hypotheses and {len(references)} references; "
            "give one of each per segment"
        )
    missing = [i for i, s in enumerate(sources) if s is None]
    if missing:
        raise StcompressError(
            f"sources: COMET needs the source transcript, missing for {len(missing)} of {n} segments "
            f"(first: {missing[0]}); set data.source_column to the English transcript column, "
            "or turn COMET off (evaluate.comet.model: null)"
        )
    return [
        {"src": src, "mt": mt, "ref": _single_reference(i, ref)}
        for i, (src, mt, ref) in enumerate(zip(sources, hypotheses, references))
    ]
