"""Data layer: audio decoding/resampling, manifests, HF datasets, the paper's split, errors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from stcompress.config import DataConfig
from stcompress.data import (
    SAMPLE_RATE,
    Example,
    builtin_manifest_path,
    examples_from_hf,
    load_audio,
    load_examples,
    paper_split,
    select_subset,
    to_mono_16k,
)
from stcompress.errors import DataError

datasets = pytest.importorskip("datasets")


def sine(freq: float, seconds: float, rate: int) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_hz(audio: np.ndarray, rate: int = SAMPLE_RATE) -> float:
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
    return float(np.fft.rfftfreq(len(audio), 1 / rate)[np.argmax(spectrum)])


def write(path: Path, audio: np.ndarray, rate: int = SAMPLE_RATE, **kwargs) -> Path:
    sf.write(path, audio, rate, **kwargs)
    return path


def write_manifest(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def clips(tmp_path: Path, n: int, seconds: float = 0.5) -> list[dict]:
    """n rows of a manifest with distinct sine clips (freq encodes the row) and de references."""
    rows = []
    for i in range(n):
        write(tmp_path / f"c{i}.wav", sine(200 + 50 * i, seconds, SAMPLE_RATE))
        rows.append({"id": f"utt-{i}", "audio": f"c{i}.wav", "text_en": f"sentence {i}", "text_de": f"Satz {i}"})
    return rows


# ---------------------------------------------------------------------------------------------
# Audio


@pytest.mark.parametrize("ext,subtype", [("wav", "PCM_16"), ("flac", "PCM_16"), ("ogg", "VORBIS")])
def test_load_audio_formats(tmp_path, ext, subtype):
    path = write(tmp_path / f"a.{ext}", sine(440, 1.0, SAMPLE_RATE), subtype=subtype)
    audio = load_audio(path)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) - SAMPLE_RATE) < 0.01 * SAMPLE_RATE
    assert abs(peak_hz(audio) - 440) < 5


def test_load_audio_mp3(tmp_path):
    path = tmp_path / "a.mp3"
    try:
        sf.write(path, sine(440, 1.0, 16000), 16000, format="MP3", subtype="MPEG_LAYER_III")
    except Exception as exc:  # libsndfile built without the LAME encoder
        pytest.skip(f"soundfile cannot write MP3 here: {exc}")
    audio = load_audio(path)
    assert abs(len(audio) / SAMPLE_RATE - 1.0) < 0.1  # the codec adds a little padding
    assert abs(peak_hz(audio) - 440) < 5


def test_stereo_is_downmixed_to_the_channel_mean(tmp_path):
    left, right = sine(300, 0.5, SAMPLE_RATE), np.full(SAMPLE_RATE // 2, 0.25, np.float32)
    audio = load_audio(write(tmp_path / "st.wav", np.stack([left, right], axis=1), subtype="FLOAT"))
    np.testing.assert_allclose(audio, (left + right) / 2, atol=1e-6)


@pytest.mark.parametrize("rate", [44100, 8000, 22050, 48000])
def test_resampling_keeps_length_and_frequency(tmp_path, rate):
    audio = load_audio(write(tmp_path / "r.wav", sine(1000, 2.0, rate), rate, subtype="FLOAT"))
    assert len(audio) == 2 * SAMPLE_RATE
    assert abs(peak_hz(audio) - 1000) < 2


def test_to_mono_16k_accepts_channels_first_and_int16():
    stereo = np.stack([sine(500, 1.0, 8000), sine(500, 1.0, 8000)])  # (channels, samples)
    out = to_mono_16k(stereo, 8000)
    assert out.shape == (SAMPLE_RATE,) and out.dtype == np.float32
    pcm = (sine(500, 1.0, 16000) * 32767).astype(np.int16)
    np.testing.assert_allclose(to_mono_16k(pcm, 16000), pcm / 32768, atol=1e-6)


@pytest.mark.parametrize("rate", [None, 0, -16000, float("nan"), "abc"])
def test_to_mono_16k_rejects_bad_sample_rate(rate):
    with pytest.raises(DataError, match=r"^clip-7: .*sample rate.*; give the array's sampling_rate"):
        to_mono_16k(np.zeros(1600, np.float32), rate, name="clip-7")


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.wav: audio file not found; check the path"):
        load_audio(tmp_path / "nope.wav")


def test_unreadable_file(tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"this is not audio at all" * 10)
    with pytest.raises(DataError, match=r"bad\.wav: cannot read audio .*; convert it"):
        load_audio(bad)


@pytest.mark.parametrize("n_samples", [0, 100])  # 100 samples = 6 ms: too short to be speech
def test_empty_audio(tmp_path, n_samples):
    path = write(tmp_path / "empty.wav", np.zeros(n_samples, np.float32))
    with pytest.raises(DataError, match=r"empty\.wav: audio is empty"):
        load_audio(path)


def test_silence_is_not_empty(tmp_path):
    assert not load_audio(write(tmp_path / "s.wav", np.zeros(1600, np.float32))).any()


def test_non_finite_samples(tmp_path):
    audio = sine(440, 0.5, SAMPLE_RATE)
    audio[100] = np.nan
    with pytest.raises(DataError, match=r"nan\.wav: audio contains NaN"):
        load_audio(write(tmp_path / "nan.wav", audio, subtype="FLOAT"))
    with pytest.raises(DataError, match=r"NaN or infinite"):
        to_mono_16k(np.where(audio == audio, audio, np.inf), 16000)


def test_example_duration():
    assert Example(id="a", audio=np.zeros(24000, np.float32), target_lang="de").duration == 1.5


# ---------------------------------------------------------------------------------------------
# Splits


@pytest.mark.parametrize("n,test_size,seed", [(884, 100, 0), (50, 10, 42), (7, 2, 3), (1000, 1, 123)])
def test_paper_split_matches_datasets_train_test_split(n, test_size, seed):
    parts = datasets.Dataset.from_dict({"i": list(range(n))}).train_test_split(test_size=test_size, seed=seed)
    train, test = paper_split(n, test_size, seed)
    assert test == list(parts["test"]["i"])
    assert train == list(parts["train"]["i"])
    if n == 884:
        assert (len(train), len(test)) == (784, 100)  # the paper's numbers


def test_select_subset_parts_are_disjoint_and_cover_everything():
    n, test_size, dev_size = 120, 20, 30
    parts = {s: select_subset(n, s, test_size, dev_size, seed=0) for s in ("train", "dev", "test")}
    assert [len(parts[s]) for s in ("train", "dev", "test")] == [70, 30, 20]
    assert sorted(parts["train"] + parts["dev"] + parts["test"]) == list(range(n))
    train, test = paper_split(n, test_size, 0)
    assert parts["test"] == test and parts["dev"] == train[:dev_size]  # dev: head of the paper's train order
    assert select_subset(n, "train", test_size, 0, seed=0) == train
    assert select_subset(n, "all", test_size, dev_size, seed=0) == list(range(n))


@pytest.mark.parametrize(
    "n,subset,test_size,dev_size,message",
    [
        (100, "train", 60, 40, r"data.test_size \+ data.dev_size: 60 \+ 40 leaves no training rows"),
        (10, "test", 0, 0, r"data.subset: 'test' is empty"),
        (10, "dev", 2, 0, r"data.subset: 'dev' is empty"),
        (10, "valid", 2, 0, r"data.subset: unknown subset 'valid'"),
    ],
)
def test_select_subset_errors(n, subset, test_size, dev_size, message):
    with pytest.raises(DataError, match=message):
        select_subset(n, subset, test_size, dev_size, seed=0)


# ---------------------------------------------------------------------------------------------
# Local manifests


def test_jsonl_manifest_loads_with_relative_paths(tmp_path):
    manifest = write_manifest(tmp_path / "m.jsonl", clips(tmp_path, 3))
    result = load_examples(DataConfig(dataset=str(manifest), id_column="id"))
    assert [e.id for e in result.examples] == ["utt-0", "utt-1", "utt-2"]
    first = result.examples[0]
    assert first.source == "sentence 0" and first.references == ("Satz 0",) and first.target_lang == "de"
    assert abs(peak_hz(first.audio) - 200) < 5 and result.skipped == [] and result.n_over_max == 0


def test_jsonl_defaults_row_ids_list_references_and_optional_columns(tmp_path):
    rows = [{"audio": r["audio"], "text_zh": ["参考一", "参考二"]} for r in clips(tmp_path, 2)]
    result = load_examples(DataConfig(dataset=str(write_manifest(tmp_path / "m.jsonl", rows)), target_lang="zh"))
    assert [e.id for e in result.examples] == ["0", "1"]
    assert result.examples[0].references == ("参考一", "参考二") and result.examples[0].source is None


def test_tsv_manifest(tmp_path):
    rows = clips(tmp_path, 2)
    lines = ["id\taudio\ttext_en\ttext_de"] + [f"{r['id']}\t{r['audio']}\t{r['text_en']}\t{r['text_de']}" for r in rows]
    (tmp_path / "m.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = load_examples(DataConfig(dataset=str(tmp_path / "m.tsv"), id_column="id"))
    assert [(e.id, e.references) for e in result.examples] == [("utt-0", ("Satz 0",)), ("utt-1", ("Satz 1",))]


def test_json_array_manifest_and_bad_tsv_row(tmp_path):
    rows = clips(tmp_path, 2)
    (tmp_path / "m.json").write_text(json.dumps(rows), encoding="utf-8")
    assert len(load_examples(DataConfig(dataset=str(tmp_path / "m.json"))).examples) == 2
    (tmp_path / "bad.tsv").write_text("audio\ttext_de\nc0.wav\tSatz\textra\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.tsv:2: 3 tab-separated fields but the header has 2"):
        load_examples(DataConfig(dataset=str(tmp_path / "bad.tsv")))


def test_split_and_limit_follow_the_paper_order(tmp_path):
    manifest = write_manifest(tmp_path / "m.jsonl", clips(tmp_path, 10, seconds=0.1))
    cfg = DataConfig(dataset=str(manifest), id_column="id", subset="test", test_size=4, split_seed=7, limit=3)
    _, test = paper_split(10, 4, 7)
    assert [e.id for e in load_examples(cfg).examples] == [f"utt-{i}" for i in test[:3]]


def test_unknown_columns_are_reported_together_with_the_available_ones(tmp_path):
    manifest = write_manifest(tmp_path / "m.jsonl", clips(tmp_path, 1))
    cfg = DataConfig(dataset=str(manifest), audio_column="wav", id_column="key", reference_column="german")
    with pytest.raises(DataError) as info:
        load_examples(cfg)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(str(manifest))
    for name in ("'wav'", "'key'", "'german'", "available columns: id, audio, text_en, text_de"):
        assert name in msg


def test_missing_reference_required(tmp_path):
    rows = clips(tmp_path, 3)
    rows[1]["text_de"] = ""
    manifest = write_manifest(tmp_path / "m.jsonl", rows)
    cfg = DataConfig(dataset=str(manifest), id_column="id")
    assert load_examples(cfg).examples[1].references == ()  # references optional by default
    with pytest.raises(DataError, match=r"^item 'utt-1': no reference in column 'text_de'"):
        load_examples(cfg, require_references=True)
    result = load_examples(cfg, on_error="skip", require_references=True)
    assert [e.id for e in result.examples] == ["utt-0", "utt-2"]
    assert result.skipped[0].id == "utt-1" and "no reference" in result.skipped[0].reason


def test_required_reference_column_absent_is_a_dataset_error(tmp_path):
    manifest = write_manifest(tmp_path / "m.jsonl", clips(tmp_path, 1))
    with pytest.raises(DataError, match=r"no column 'text_zh' \(data.reference_column\); available columns"):
        load_examples(DataConfig(dataset=str(manifest), target_lang="zh"), require_references=True)


def test_bad_items_fail_or_are_skipped(tmp_path):
    rows = clips(tmp_path, 4)
    rows[1]["audio"] = "missing.wav"
    (tmp_path / "bad.wav").write_bytes(b"garbage" * 50)
    rows[2]["audio"] = "bad.wav"
    write(tmp_path / "empty.flac", np.zeros(0, np.float32))
    rows[3]["audio"] = "empty.flac"
    cfg = DataConfig(dataset=str(write_manifest(tmp_path / "m.jsonl", rows)), id_column="id")
    with pytest.raises(DataError, match=r"^item 'utt-1': .*missing\.wav: audio file not found.*--on-error skip"):
        load_examples(cfg)
    result = load_examples(cfg, on_error="skip")
    assert [e.id for e in result.examples] == ["utt-0"]
    reasons = {s.id: s.reason for s in result.skipped}
    assert list(reasons) == ["utt-1", "utt-2", "utt-3"]
    assert "not found" in reasons["utt-1"] and "cannot read" in reasons["utt-2"] and "empty" in reasons["utt-3"]


def test_unknown_language(tmp_path):
    manifest = write_manifest(tmp_path / "m.jsonl", clips(tmp_path, 1))
    with pytest.raises(DataError, match=r"^data.target_lang: unknown language code 'xx'; use one of"):
        load_examples(DataConfig(dataset=str(manifest), target_lang="xx"))


def test_duplicate_ids(tmp_path):
    rows = clips(tmp_path, 3)
    rows[2]["id"] = "utt-0"
    manifest = write_manifest(tmp_path / "m.jsonl", rows)
    with pytest.raises(DataError, match=r"duplicate id 'utt-0' at rows 0, 2 in column 'id'; make ids unique"):
        load_examples(DataConfig(dataset=str(manifest), id_column="id"))


def test_manifest_problems(tmp_path):
    with pytest.raises(DataError, match=r"^data.dataset: .*nothere\.jsonl does not exist"):
        load_examples(DataConfig(dataset=str(tmp_path / "nothere.jsonl")))
    (tmp_path / "broken.jsonl").write_text('{"audio": "a.wav"}\n{oops\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"broken\.jsonl:2: not valid JSON"):
        load_examples(DataConfig(dataset=str(tmp_path / "broken.jsonl")))
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"empty\.jsonl: the dataset has no rows"):
        load_examples(DataConfig(dataset=str(tmp_path / "empty.jsonl")))
    with pytest.raises(DataError, match=r"^on_error: unknown value 'ignore'"):
        load_examples(DataConfig(), on_error="ignore")


def test_clips_over_max_seconds_are_counted_and_warned_once(tmp_path, caplog):
    write(tmp_path / "long.flac", sine(300, 31.0, SAMPLE_RATE))
    write(tmp_path / "short.flac", sine(300, 2.0, SAMPLE_RATE))
    manifest = write_manifest(tmp_path / "m.jsonl", [{"audio": "long.flac"}, {"audio": "short.flac"}])
    with caplog.at_level(logging.WARNING, logger="stcompress.data.sources"):
        result = load_examples(DataConfig(dataset=str(manifest)))
    assert result.n_over_max == 1 and len(result.examples) == 2
    warnings = [r.getMessage() for r in caplog.records if r.name == "stcompress.data.sources"]
    assert len(warnings) == 1 and "1 of 2 clips are longer than 30 s" in warnings[0]


# ---------------------------------------------------------------------------------------------
# Hugging Face datasets (built locally; no network)


def hf_dataset(tmp_path: Path, n: int, prefix: str = "seg"):
    paths = []
    for i in range(n):
        rate = 44100 if i % 2 else 16000  # mixed rates: decoding must resample per item
        paths.append(str(write(tmp_path / f"{prefix}{i}.flac", sine(300 + 100 * i, 0.5, rate), rate)))
    columns = {
        "audio": paths,
        "text_en": [f"english {i}" for i in range(n)],
        "text_de": [f"deutsch {i}" for i in range(n)],
        "text_zh": [f"中文 {i}" for i in range(n)],
    }
    return datasets.Dataset.from_dict(columns).cast_column("audio", datasets.Audio())


def test_hf_dataset_saved_to_disk(tmp_path):
    hf_dataset(tmp_path, 4).save_to_disk(str(tmp_path / "saved"))
    for f in tmp_path.glob("seg*.flac"):
        f.unlink()  # save_to_disk embedded the bytes: the source files are no longer needed
    result = load_examples(DataConfig(dataset=str(tmp_path / "saved"), target_lang="zh"), require_references=True)
    assert [e.id for e in result.examples] == ["0", "1", "2", "3"]
    assert [e.references for e in result.examples][3] == ("中文 3",)
    assert result.examples[1].source == "english 1"
    for i, ex in enumerate(result.examples):
        assert len(ex.audio) == SAMPLE_RATE // 2 and abs(peak_hz(ex.audio) - (300 + 100 * i)) < 5


def test_hf_dataset_dict_split_expression_concatenates(tmp_path):
    dd = datasets.DatasetDict({"dev": hf_dataset(tmp_path, 2, "dev"), "eval": hf_dataset(tmp_path, 3, "ev")})
    dd.save_to_disk(str(tmp_path / "dd"))
    result = load_examples(DataConfig(dataset=str(tmp_path / "dd"), split="dev+eval"))
    assert [e.source for e in result.examples] == ["english 0", "english 1", "english 0", "english 1", "english 2"]
    with pytest.raises(DataError, match=r"no split 'test'; available splits: dev, eval"):
        load_examples(DataConfig(dataset=str(tmp_path / "dd"), split="test"))


def test_hf_parquet_folder_through_load_dataset(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    (tmp_path / "pq").mkdir()
    hf_dataset(tmp_path, 3).to_parquet(str(tmp_path / "pq" / "data.parquet"))
    result = load_examples(DataConfig(dataset=str(tmp_path / "pq"), split="train", subset="test", test_size=1))
    _, test = paper_split(3, 1, 0)
    assert [e.id for e in result.examples] == [str(i) for i in test]


def test_hf_in_memory_dataset_with_paths_and_errors(tmp_path):
    ds = hf_dataset(tmp_path, 2)  # not saved: cells hold paths only
    result = examples_from_hf(ds, DataConfig(), name="mem")
    assert len(result.examples) == 2 and result.examples[0].references == ("deutsch 0",)
    with pytest.raises(DataError, match=r"^mem: no column 'speech' \(data.audio_column\); available columns: audio, text_en"):
        examples_from_hf(ds, DataConfig(audio_column="speech"), name="mem")
    (tmp_path / "seg1.flac").unlink()
    with pytest.raises(DataError, match=r"^item '1': .*seg1\.flac: audio file not found"):
        examples_from_hf(ds, DataConfig(), name="mem")


def test_hf_missing_dataset_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    with pytest.raises(DataError) as info:
        load_examples(DataConfig(dataset=str(tmp_path / "no-such-folder"), format="hf"))
    assert "cannot load the dataset" in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# The built-in example


@pytest.mark.parametrize("lang", ["de", "zh"])
def test_builtin_example(lang):
    result = load_examples(DataConfig(dataset="builtin", target_lang=lang), require_references=True)
    assert len(result.examples) == 12 and not result.skipped and result.n_over_max == 0
    ids = [e.id for e in result.examples]
    assert ids[0] == "builtin-001" and len(set(ids)) == 12
    for ex in result.examples:
        assert ex.audio.dtype == np.float32 and 1.0 < ex.duration < 10.0
        assert np.abs(ex.audio).max() > 0.05  # speech, not silence
        assert ex.source and ex.references and ex.references[0].strip()
    if lang == "zh":
        assert all(any("\u4e00" <= ch <= "\u9fff" for ch in ex.references[0]) for ex in result.examples)
    assert builtin_manifest_path().is_file()


def test_builtin_files_are_16k_mono_flac():
    folder = builtin_manifest_path().parent
    rows = [json.loads(line) for line in builtin_manifest_path().read_text(encoding="utf-8").splitlines()]
    total = sum((folder / r["audio"]).stat().st_size for r in rows)
    assert total < 1.5e6
    for r in rows:
        info = sf.info(str(folder / r["audio"]))
        assert (info.samplerate, info.channels, info.format) == (SAMPLE_RATE, 1, "FLAC")


def test_many_clips_decode_in_parallel_in_dataset_order_with_errors_in_order(tmp_path, monkeypatch):
    """Large datasets decode on threads: same examples, same order, the first bad item named."""
    from stcompress.data import sources

    monkeypatch.setattr(sources.os, "cpu_count", lambda: 4)
    rows = clips(tmp_path, 64, seconds=0.1)
    (tmp_path / "c20.wav").write_bytes(b"not audio")
    (tmp_path / "c41.wav").write_bytes(b"not audio either")
    manifest = write_manifest(tmp_path / "m.jsonl", rows)
    assert sources._decode_workers(64) == 4
    result = load_examples(DataConfig(dataset=str(manifest), id_column="id"), on_error="skip")
    assert [e.id for e in result.examples] == [f"utt-{i}" for i in range(64) if i not in (20, 41)]
    assert [s.id for s in result.skipped] == ["utt-20", "utt-41"]
    for e in result.examples[::9]:
        assert abs(peak_hz(e.audio) - (200 + 50 * int(e.id[4:]))) < 15
    with pytest.raises(DataError, match="item 'utt-20'"):
        load_examples(DataConfig(dataset=str(manifest), id_column="id"))
