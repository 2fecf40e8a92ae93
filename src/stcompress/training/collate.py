"""Training items -> token ids with masked labels -> padded batches with audio features.

Token ids are built once per item (`encode_items`), before training, so every length problem is
reported up front. Each batch runs the processor's feature extractor on its clips
(`input_features` + `feature_attention_mask`), so the audio tower is part of the training graph.
Batches are right-padded: pads get attention 0 and label IGNORE_INDEX; positions come from the
attention mask, so the padding side never changes the loss.

With a frozen audio tower (`train.cache_audio`), `TowerCache` runs the tower once per distinct clip
before training and the collator hands its stored output (`audio_states`, `audio_lengths`) to the
forward pass instead of mel features: same numbers, no tower or feature-extractor work per step.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from stcompress.data.audio import SAMPLE_RATE
from stcompress.model.tower_memo import clip_key, tower_outputs
from stcompress.data.training import TrainItem
from stcompress.errors import DataError
from stcompress.prompt import IGNORE_INDEX, PromptBuilder, num_audio_tokens

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class Encoded:
    item: TrainItem
    input_ids: list[int]
    labels: list[int]

    @property
    def n_target(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


@dataclass
class EncodeReport:
    """What encoding kept and dropped (written to the manifest)."""

    kept: int = 0
    long_audio: int = 0  # clips over the extractor's limit (skipped or truncated, per policy)
    too_long: list[str] = field(default_factory=list)  # ids skipped under on_too_long=skip

    def to_dict(self, policy: str) -> dict[str, Any]:
        return {"kept": self.kept, "audio_over_limit": self.long_audio, "audio_policy": policy,
                "skipped_too_long": len(self.too_long)}


def audio_frames(n_samples: int, feature_extractor: Any) -> int:
    """Mel frames the extractor marks as real for a clip: one per hop, capped at its 30 s window."""
    return math.ceil(min(n_samples, feature_extractor.n_samples) / feature_extractor.hop_length)


def encode_items(
    items: Sequence[TrainItem], builder: PromptBuilder, feature_extractor: Any, *,
    max_length: int, on_too_long: str = "fail", long_audio: str = "skip", what: str = "training data",
) -> tuple[list[Encoded], EncodeReport]:
    """Prompt + target ids and labels per item; length problems are reported all at once."""
    report = EncodeReport()
    out: list[Encoded] = []
    too_long: list[tuple[str, int, int]] = []
    for item in items:
        if not item.target:
            raise DataError(f"{what}: item {item.id!r} has an empty target; drop it or fill in the translation")
        if len(item.example.audio) > feature_extractor.n_samples:
            report.long_audio += 1
            if long_audio == "skip":
                continue
        n_audio = num_audio_tokens(audio_frames(len(item.example.audio), feature_extractor))
        ids, labels = builder.training_ids(item.example.target_lang, n_audio, item.target)
        if len(ids) > max_length:
            too_long.append((item.id, len(ids), len(ids) - sum(label != IGNORE_INDEX for label in labels)))
            continue
        out.append(Encoded(item=item, input_ids=ids, labels=labels))
    if too_long and on_too_long == "fail":
        worst = max(too_long, key=lambda t: t[1])
        raise DataError(
            f"train.max_length: {len(too_long)} items of the {what} are longer than {max_length} tokens (longest: "
            f"{worst[0]!r}, {worst[1]} = {worst[2]} prompt + {worst[1] - worst[2]} target tokens); raise "
            "train.max_length or pass --train.on-too-long skip"
        )
    report.too_long = [t[0] for t in too_long]
    report.kept = len(out)
    if report.long_audio:
        log.warning("%s: %d clips are longer than %d s; policy %s", what, report.long_audio,
                    feature_extractor.n_samples // SAMPLE_RATE, long_audio)
    if too_long:
        log.warning("%s: skipped %d items longer than train.max_length %d", what, len(too_long), max_length)
    return out, report


class TowerCache:
    """Audio-tower output per distinct clip, computed once with the tower frozen (no gradients).

    Stored on the CPU in the tower's dtype; `states(keys)` pads a batch of them. The stored output
    is exactly what the forward pass would compute (`arch.tower_states` on the same features).
    """

    def __init__(self) -> None:
        self.store: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.store)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.store.values())

    def fill(self, model: Any, feature_extractor: Any, items: Sequence[Encoded]) -> None:
        todo: dict[str, Any] = {}
        for e in items:
            key = clip_key(e.item.example.audio)
            if key not in self.store:
                todo.setdefault(key, e.item.example.audio)
        outs = tower_outputs(model, feature_extractor, list(todo.values()))
        self.store.update(zip(todo, outs))

    def states(self, keys: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.store[k] for k in keys]
        lengths = torch.tensor([r.shape[0] for r in rows])
        out = rows[0].new_zeros(len(rows), int(lengths.max()), rows[0].shape[-1])
        for i, r in enumerate(rows):
            out[i, : r.shape[0]] = r
        return out, lengths


class Collator:
    """Right-padded ids, attention mask and labels, plus the batch's audio features (or the cached
    tower output when a `TowerCache` is given)."""

    def __init__(self, feature_extractor: Any, pad_id: int, audio_token_id: int, tower_cache: TowerCache | None = None):
        self.feature_extractor = feature_extractor
        self.pad_id = pad_id
        self.audio_token_id = audio_token_id
        self.tower_cache = tower_cache

    def _audio(self, batch: Sequence[Encoded]) -> tuple[dict[str, torch.Tensor], list[int]]:
        """Model inputs for the clips and the audio tokens each one yields."""
        if self.tower_cache is not None:
            states, lengths = self.tower_cache.states([clip_key(e.item.example.audio) for e in batch])
            return {"audio_states": states, "audio_lengths": lengths}, lengths.tolist()
        feats = self.feature_extractor(
            [e.item.example.audio for e in batch], sampling_rate=SAMPLE_RATE, padding="max_length",
            truncation=True, return_attention_mask=True, return_tensors="pt",
        )
        expected = [num_audio_tokens(int(n)) for n in feats["attention_mask"].sum(-1)]
        return {"input_features": feats["input_features"], "feature_attention_mask": feats["attention_mask"]}, expected

    def __call__(self, batch: Sequence[Encoded]) -> dict[str, torch.Tensor]:
        audio, expected = self._audio(batch)
        width = max(len(e.input_ids) for e in batch)
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        for i, e in enumerate(batch):
            n = len(e.input_ids)
            input_ids[i, :n] = torch.tensor(e.input_ids)
            attention_mask[i, :n] = 1
            labels[i, :n] = torch.tensor(e.labels)
        placed = (input_ids == self.audio_token_id).sum(-1).tolist()
        if expected != placed:  # the ids were built for a different feature extractor
            raise DataError(f"training batch: audio placeholders {placed} do not match the clips' audio tokens {expected}; "
                            "use the processor saved with the model")
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, **audio}
