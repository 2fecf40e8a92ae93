"""A WAV whose data chunk was cut short (an interrupted copy) is refused, not translated in part."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from stcompress.config import DataConfig
from stcompress.data.audio import decode_audio_bytes, load_audio, wav_declared_frames
from stcompress.data.sources import load_examples
from stcompress.errors import DataError


def _wav(path, seconds=2.0, subtype="PCM_16", rate=16000):
    sf.write(str(path), (0.1 * np.random.default_rng(0).standard_normal(int(seconds * rate))).astype(np.float32),
             rate, subtype=subtype)
    return path


@pytest.mark.parametrize("subtype", ["PCM_16", "PCM_24", "FLOAT"])
def test_truncated_wav_is_refused_with_both_lengths(tmp_path, subtype):
    path = _wav(tmp_path / "a.wav", subtype=subtype)
    data = path.read_bytes()
    assert wav_declared_frames(data) == 32000
    assert len(load_audio(path)) == 32000  # the complete file loads as before
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"a\.wav: the file is cut short: its WAV header declares 32000 frames \(2\.00 s\) "
                                        r"but it holds \d+ \(1\.0\d s\)"):
        load_audio(path)
    with pytest.raises(DataError, match="cut short"):
        decode_audio_bytes(path.read_bytes(), name="cell")


def test_other_formats_and_unknown_lengths_are_not_judged(tmp_path):
    flac = tmp_path / "a.flac"
    sf.write(str(flac), np.zeros(1600, np.float32), 16000)
    assert wav_declared_frames(flac.read_bytes()) is None
    wav = bytearray(_wav(tmp_path / "s.wav").read_bytes())
    data_at = wav.index(b"data")
    wav[data_at + 4 : data_at + 8] = (0xFFFFFFFF).to_bytes(4, "little")  # streaming writers' "unknown length"
    assert wav_declared_frames(bytes(wav)) is None


def test_truncated_item_fails_or_is_skipped(tmp_path):
    good, cut = _wav(tmp_path / "good.wav"), _wav(tmp_path / "cut.wav")
    cut.write_bytes(cut.read_bytes()[:20000])
    rows = [{"id": "g", "audio": good.name, "text_de": "x"}, {"id": "c", "audio": cut.name, "text_de": "y"}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(dataset=str(tmp_path / "m.jsonl"))
    with pytest.raises(DataError, match=r"item 'c': .*cut\.wav: the file is cut short.*--on-error skip"):
        load_examples(cfg)
    result = load_examples(cfg, on_error="skip")
    assert [e.id for e in result.examples] == ["g"] and "cut short" in result.skipped[0].reason
