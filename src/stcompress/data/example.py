"""The unit every stage consumes: one audio clip with its id, target language and references."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from stcompress.data.audio import SAMPLE_RATE


# eq=False: dataclass equality would compare numpy arrays (ambiguous truth value) and hashing
# would fail on them; examples are compared by identity, and by `id` where it matters.
@dataclass(frozen=True, eq=False)
class Example:
    """One segment: `audio` is float32, mono, 16 kHz (as the Qwen2-Audio feature extractor expects)."""

    id: str
    audio: np.ndarray
    target_lang: str
    source: str | None = None  # gold English transcript (COMET's source), when the data has one
    references: tuple[str, ...] = ()

    @property
    def duration(self) -> float:
        """Length in seconds; the feature extractor truncates past 30 s."""
        return len(self.audio) / SAMPLE_RATE


@dataclass(frozen=True)
class Skipped:
    """An item left out under on_error=skip, kept so the stage can report it."""

    id: str
    reason: str


@dataclass
class LoadResult:
    examples: list[Example] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    n_over_max: int = 0  # clips longer than DataConfig.max_audio_seconds
