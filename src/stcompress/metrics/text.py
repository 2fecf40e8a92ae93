"""String-based translation metrics (BLEU, chrF, chrF++) computed by sacrebleu.

Scorers live in a small registry looked up by short name from config (`evaluate.metrics`,
`importance.metric`). Every score is stored with its sacrebleu signature so numbers from different
runs can be compared honestly. COMET is a known name too, but it needs a model and the source
transcripts, so `stcompress.metrics.comet.CometScorer` computes it, not this module.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from stcompress.errors import StcompressError
from stcompress.languages import bleu_tokenizer, check_language

# sacrebleu keeps test sets (and lock files of failed downloads) under $SACREBLEU, ~/.sacrebleu by
# default; it reads the variable at import time, so set it first.
os.environ.setdefault("SACREBLEU", os.path.join(tempfile.gettempdir(), "stcompress-sacrebleu"))

import sacrebleu  # noqa: E402
from sacrebleu.metrics.base import Metric  # noqa: E402

References = Sequence[str] | Sequence[Sequence[str | None]]


@dataclass(frozen=True)
class Score:
    """One corpus-level score, with what is needed to reproduce it."""

    name: str
    score: float
    signature: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Score:
        return cls(name=str(data["name"]), score=float(data["score"]), signature=str(data["signature"]))


@dataclass(frozen=True)
class MetricSpec:
    """A registry entry: how to build the sacrebleu metric for a target language."""

    name: str
    build: Callable[[str, bool], Metric]  # (target language, sentence_level) -> metric
    source: str  # where the metric (and its settings) come from


def _bleu(lang: str, sentence_level: bool) -> Metric:
    # Sentence BLEU without effective order is 0 for most short segments; sacrebleu's own
    # `sentence_bleu` turns it on for the same reason.
    return sacrebleu.BLEU(tokenize=bleu_tokenizer(lang), effective_order=sentence_level)


def _chrf(lang: str, sentence_level: bool) -> Metric:
    check_language(lang)
    return sacrebleu.CHRF(char_order=6, word_order=0)


def _chrf_pp(lang: str, sentence_level: bool) -> Metric:
    check_language(lang)
    return sacrebleu.CHRF(char_order=6, word_order=2)


METRICS: dict[str, MetricSpec] = {
    "bleu": MetricSpec(
        "bleu", _bleu,
        "Papineni et al. 2002; sacrebleu (Post 2018), tokenize 13a, or zh for Chinese as in the paper",
    ),
    "chrf": MetricSpec(
        "chrf", _chrf,
        "Popovic 2015 (chrF, char order 6, beta 2); the paper's layer-selection metric for Chinese",
    ),
    "chrf++": MetricSpec(
        "chrf++", _chrf_pp,
        "Popovic 2017 (chrF++, word order 2); the paper's layer-selection metric for German",
    ),
}

# Known to config validation, computed elsewhere (needs a neural model and source transcripts).
MODEL_METRICS: dict[str, str] = {
    "comet": "Rei et al. 2020 (COMET); scored by stcompress.metrics.comet.CometScorer",
}


def available_metrics() -> list[str]:
    """Every metric name a config may use, the model-based ones included."""
    return sorted(METRICS) + sorted(MODEL_METRICS)


def _spec(name: str) -> MetricSpec:
    if name in METRICS:
        return METRICS[name]
    if name in MODEL_METRICS:
        raise StcompressError(
            f"metric {name!r}: needs a model and the source transcripts, not computed from strings; "
            "use stcompress.metrics.comet.CometScorer (config: evaluate.comet.model)"
        )
    raise StcompressError(f"metric {name!r}: unknown metric; use one of {', '.join(available_metrics())}")


# sacrebleu tokenizers that need packages of their own -> our extra that installs them
_TOKENIZER_EXTRAS = {"ja-mecab": "ja", "ko-mecab": "ko"}


def check_scorer(lang: str, metrics: Sequence[str], *, item: str = "data.target_lang") -> None:
    """Fail before any model loads when a metric cannot score `lang` on this machine.

    Japanese and Korean BLEU tokenize with MeCab (sacrebleu's `ja-mecab` / `ko-mecab`), an
    optional dependency; building each scorer once is the exact test (chrF needs no tokenizer).
    """
    check_language(lang, item=item)
    for name in metrics:
        if name not in METRICS:
            continue  # unknown names are reported by the metric checks; model metrics elsewhere
        try:
            METRICS[name].build(lang, False)
        except (RuntimeError, ImportError) as exc:
            tokenizer = bleu_tokenizer(lang)
            extra = _TOKENIZER_EXTRAS.get(tokenizer)
            fix = f"pip install 'stcompress[{extra}]'" if extra else "reinstall sacrebleu"
            raise StcompressError(
                f"{item}: {name} for {lang!r} needs sacrebleu's {tokenizer} tokenizer, which cannot run here "
                f"({_first_line(exc)}); {fix}, or score with chrf only (--metrics chrf)"
            ) from None


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _check_hypotheses(hypotheses: Sequence[str]) -> list[str]:
    if isinstance(hypotheses, str) or not isinstance(hypotheses, Sequence):
        raise StcompressError("hypotheses: expected a list of strings; pass one string per segment")
    if len(hypotheses) == 0:
        raise StcompressError("hypotheses: the list is empty; translate at least one segment first")
    for i, hyp in enumerate(hypotheses):
        if not isinstance(hyp, str):
            raise StcompressError(
                f"hypotheses[{i}]: expected a string, got {type(hyp).__name__}; use '' for an empty output"
            )
    return list(hypotheses)


def _per_segment(references: References, n: int) -> list[list[str]]:
    """Normalise references to one list of reference strings per segment."""
    if isinstance(references, str) or not isinstance(references, Sequence):
        raise StcompressError("references: expected a list; pass one string (or list of strings) per segment")
    if len(references) != n:
        raise StcompressError(
            f"references: {len(references)} segments but {n} hypotheses; "
            "give one reference (or one list of references) per hypothesis"
        )
    segments = []
    for i, refs in enumerate(references):
        if isinstance(refs, str):
            refs = [refs]
        elif isinstance(refs, Sequence):
            refs = [r for r in refs if r is not None]
        else:
            refs = []
        if not refs or not all(isinstance(r, str) for r in refs):
            raise StcompressError(f"references[{i}]: no reference string for this segment; give at least one")
        segments.append(refs)
    return segments


def _streams(segments: list[list[str]]) -> list[list[str | None]]:
    """Per-segment lists -> sacrebleu's reference streams; None pads ragged sets (sacrebleu skips it)."""
    width = max(len(refs) for refs in segments)
    return [[refs[k] if k < len(refs) else None for refs in segments] for k in range(width)]


def corpus_score(metric: str, hypotheses: Sequence[str], references: References, lang: str) -> Score:
    """Corpus-level score; `references` holds one string or one list of strings per segment."""
    spec = _spec(metric)
    hyps = _check_hypotheses(hypotheses)
    streams = _streams(_per_segment(references, len(hyps)))
    scorer = spec.build(lang, False)
    result = scorer.corpus_score(hyps, streams)
    return Score(name=spec.name, score=float(result.score), signature=str(scorer.get_signature()))


def corpus_scores(
    metrics: Sequence[str], hypotheses: Sequence[str], references: References, lang: str
) -> dict[str, Score]:
    """Several corpus scores; every unknown name is reported at once, before any scoring."""
    unknown = [m for m in metrics if m not in METRICS and m not in MODEL_METRICS]
    if unknown:
        names = ", ".join(repr(m) for m in unknown)
        raise StcompressError(f"metrics: unknown metric(s) {names}; use one of {', '.join(available_metrics())}")
    return {m: corpus_score(m, hypotheses, references, lang) for m in metrics}


def sentence_scores(metric: str, hypotheses: Sequence[str], references: References, lang: str) -> list[float]:
    """One score per segment (best over that segment's references), for per-segment analysis."""
    spec = _spec(metric)
    hyps = _check_hypotheses(hypotheses)
    segments = _per_segment(references, len(hyps))
    scorer = spec.build(lang, True)
    return [float(scorer.sentence_score(h, refs).score) for h, refs in zip(hyps, segments)]
