"""Scoring a layer-removed variant by translating the dev set: the paper's criterion.

No model copies: the decoder runs through a view of its layer list (`decoder_view`), and the
audio features are computed once for the whole search (decoder-only removal never changes them).
A candidate `(*removed, layer)` runs inside the view without `removed` and skips `layer`, so all
candidates of a round share that view's prefill below their layer (`translate.PrefillStore`;
exact, off with `reuse_prefill=False`). Removing audio-encoder layers (the paper's ablation)
changes the features, so that mode re-encodes the audio for every variant.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

from stcompress.data.example import Example
from stcompress.errors import StcompressError
from stcompress.metrics.comet import CometScorer
from stcompress.metrics.text import METRICS, corpus_scores
from stcompress.model import arch
from stcompress.model.layers import decoder_view, encoder_view
from stcompress.translate import AudioCache, PrefillStore, Translator


def check_metrics(names: Sequence[str]) -> None:
    known = [*METRICS, "comet"]
    bad = [n for n in names if n not in known]
    if bad:
        raise StcompressError(f"metric: unknown metric {bad[0]!r}; use one of {', '.join(known)}")


class GenerationEvaluator:
    """evaluate(removed, n) -> scores of the model without `removed` on the first n dev segments."""

    def __init__(
        self,
        translator: Translator,
        examples: Sequence[Example],
        metrics: Sequence[str],
        *,
        component: str = "decoder",
        comet: CometScorer | None = None,
        reuse_prefill: bool = True,
    ):
        check_metrics(metrics)
        if "comet" in metrics and comet is None:
            raise StcompressError("metric: comet needs a COMET model; set comet.model (e.g. Unbabel/wmt22-comet-da)")
        self.translator = translator
        self.model = translator.model
        self.examples = list(examples)
        self.metrics = list(dict.fromkeys(metrics))
        self.component = component
        self.comet = comet
        self.lang = self.examples[0].target_lang
        missing = [ex.id for ex in self.examples if not ex.references]
        if missing:
            raise StcompressError(f"data: dev segment {missing[0]!r} has no reference translation; the search scores against references")
        self.n_layers = len(arch.audio_tower(self.model).layers) if component == "encoder" else arch.num_decoder_layers(self.model)
        self.cache: AudioCache | None = None if component == "encoder" else translator.encode(self.examples)
        reuse = reuse_prefill and component == "decoder" and translator.reuses_prefill()
        self.prefills: PrefillStore | None = PrefillStore() if reuse else None

    def _view(self, removed: Sequence[int]) -> contextlib.AbstractContextManager[None]:
        keep = [i for i in range(self.n_layers) if i not in set(removed)]
        return encoder_view(self.model, keep) if self.component == "encoder" else decoder_view(self.model, keep)

    def evaluate(self, removed: Sequence[int], n_segments: int) -> tuple[dict[str, float], dict[str, str], list[dict[str, Any]]]:
        subset = self.examples[:n_segments]
        if self.prefills is not None:
            base = list(removed[:-1])
            keep = [i for i in range(self.n_layers) if i not in set(base)]
            skip = keep.index(removed[-1]) if removed else None
            with self._view(base):
                hyps = self.translator.translate(subset, cache=self.cache, prefills=self.prefills, skip_layer=skip)
        else:
            with self._view(removed):
                hyps = self.translator.translate(subset, cache=self.cache)
        texts = [h.text for h in hyps]
        refs = [list(ex.references) for ex in subset]
        text_metrics = [m for m in self.metrics if m != "comet"]
        results = corpus_scores(text_metrics, texts, refs, self.lang)
        scores = {name: s.score for name, s in results.items()}
        signatures = {name: s.signature for name, s in results.items()}
        if "comet" in self.metrics and self.comet is not None:
            comet = self.comet.score([ex.source for ex in subset], texts, [r[0] for r in refs])
            scores["comet"], signatures["comet"] = comet.score, comet.signature
        rows = [{"id": h.id, "hypothesis": h.text, "n_tokens": h.n_tokens} for h in hyps]
        return scores, signatures, rows
