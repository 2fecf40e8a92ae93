"""Audio in, float32 mono 16 kHz out, with soundfile and scipy only.

Why not torchaudio / librosa / torchcodec: they pull FFmpeg or large native stacks; soundfile
(>= 0.12 bundles libsndfile 1.1+, which reads WAV, FLAC, OGG/Vorbis/Opus and MP3) covers the
formats speech corpora ship in. Resampling is polyphase (`scipy.signal.resample_poly`), exact for
the rational ratios of common rates (44.1k -> 16k is 160/441).
"""

from __future__ import annotations

import io
from math import gcd
from pathlib import Path

import numpy as np
import soundfile as sf

from stcompress.errors import DataError

SAMPLE_RATE = 16000
MIN_SECONDS = 0.01  # shorter than 10 ms is "empty": no feature frame worth translating

_CONVERT_HINT = "convert it to WAV, FLAC, OGG or MP3 (e.g. `ffmpeg -i IN -ar 16000 -ac 1 OUT.flac`)"


def load_audio(path: str | Path) -> np.ndarray:
    """Read an audio file as float32 mono 16 kHz; DataError names the file and the fix."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not an audio file" if path.is_dir() else "audio file not found"
        raise DataError(f"{path}: {what}; check the path (relative paths are resolved against the manifest's folder)")
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
        with path.open("rb") as f:
            head = f.read(_HEADER_BYTES)
    except (sf.LibsndfileError, sf.SoundFileError, RuntimeError, ValueError, OSError) as exc:
        raise DataError(f"{path}: cannot read audio ({_short(exc)}); {_CONVERT_HINT}") from None
    _check_complete(head, data.shape[0], rate, str(path))
    return _finish(data, rate, str(path))


def decode_audio_bytes(data: bytes, *, name: str = "audio bytes") -> np.ndarray:
    """Decode an encoded file held in memory (HF datasets' {"bytes": ...} audio cells)."""
    if not data:
        raise DataError(f"{name}: the audio bytes are empty; fix the dataset's audio cell")
    try:
        array, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, sf.SoundFileError, RuntimeError, ValueError) as exc:
        raise DataError(f"{name}: cannot decode audio bytes ({_short(exc)}); {_CONVERT_HINT}") from None
    _check_complete(data[:_HEADER_BYTES], array.shape[0], rate, name)
    return _finish(array, rate, name)


_HEADER_BYTES = 1 << 16  # WAV chunks before `data` (fmt, fact, LIST, PEAK) fit in far less


def wav_declared_frames(head: bytes) -> int | None:
    """Frames a RIFF/WAVE header declares (data chunk size / block align); None when the bytes are
    not a WAV header or the size is the 'unknown length' placeholder streaming writers leave."""
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    pos, block_align = 12, None
    while pos + 8 <= len(head):
        chunk, size = head[pos : pos + 4], int.from_bytes(head[pos + 4 : pos + 8], "little")
        if chunk == b"fmt " and pos + 22 <= len(head):
            block_align = int.from_bytes(head[pos + 20 : pos + 22], "little")
        elif chunk == b"data":
            if not block_align or size in (0, 0xFFFFFFFF):
                return None
            return size // block_align
        pos += 8 + size + (size & 1)  # chunks are word-aligned
    return None


def _check_complete(head: bytes, frames: int, rate: int, name: str) -> None:
    """A WAV cut short (interrupted copy or download) decodes without error to the frames that are
    left: refuse it rather than translate part of the speech."""
    declared = wav_declared_frames(head)
    if declared is not None and frames < declared:
        raise DataError(
            f"{name}: the file is cut short: its WAV header declares {declared} frames ({declared / rate:.2f} s) "
            f"but it holds {frames} ({frames / rate:.2f} s); copy or download it again, or re-export it"
        )


def to_mono_16k(array: np.ndarray, sample_rate: int | float | None, *, name: str = "audio array") -> np.ndarray:
    """Normalise an in-memory array ({array, sampling_rate} cells) to float32 mono 16 kHz.

    1-D arrays are mono; for 2-D arrays the shorter axis is taken as channels, so both
    (samples, channels) from soundfile and (channels, samples) from torch-style decoders work.
    Integer PCM is scaled to [-1, 1).
    """
    rate = _check_rate(sample_rate, name)
    x = np.asarray(array)
    if x.ndim == 0 or x.ndim > 2:
        raise DataError(f"{name}: expected a 1-D (mono) or 2-D (multi-channel) array, got shape {x.shape}; pass samples as a 1-D array")
    if np.issubdtype(x.dtype, np.integer):
        x = x.astype(np.float64) / float(2 ** (8 * x.dtype.itemsize - 1))
    elif not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"{name}: audio samples have dtype {x.dtype}; pass float or integer PCM samples")
    if x.ndim == 2 and x.shape[0] < x.shape[1]:
        x = x.T  # (channels, samples) -> (samples, channels)
    return _finish(x.reshape(len(x), -1), rate, name)


def _finish(frames: np.ndarray, rate: int, name: str) -> np.ndarray:
    """(samples, channels) at `rate` -> checked float32 mono 16 kHz."""
    if frames.shape[0] < max(1, round(rate * MIN_SECONDS)):
        secs = frames.shape[0] / rate if rate else 0.0
        raise DataError(f"{name}: audio is empty ({frames.shape[0]} samples, {secs * 1000:.1f} ms); replace the file or drop the item")
    mono = frames.mean(axis=1, dtype=np.float64) if frames.shape[1] > 1 else frames[:, 0].astype(np.float64)
    if not np.all(np.isfinite(mono)):
        raise DataError(f"{name}: audio contains NaN or infinite samples; re-export the file")
    return resample(mono, rate)


def resample(mono: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """Polyphase resampling by the reduced ratio target/rate; float32 out."""
    if rate != target:
        from scipy.signal import resample_poly  # only resampling needs scipy

        g = gcd(rate, target)
        mono = resample_poly(mono, target // g, rate // g)
    return np.ascontiguousarray(mono, dtype=np.float32)


def _check_rate(sample_rate: int | float | None, name: str) -> int:
    if sample_rate is None or isinstance(sample_rate, bool):
        raise DataError(f"{name}: the sample rate is missing; give the array's sampling_rate in Hz (e.g. 16000)")
    try:
        rate = float(sample_rate)
    except (TypeError, ValueError):
        rate = float("nan")
    if not np.isfinite(rate) or rate <= 0:
        raise DataError(f"{name}: invalid sample rate {sample_rate!r}; give the array's sampling_rate in Hz (e.g. 16000)")
    return int(round(rate))


def _short(exc: Exception) -> str:
    """First line of an exception, for one-line messages."""
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]
