"""Metrics: sacrebleu scorers, COMET wiring (with a scorer double) and efficiency numbers."""

from __future__ import annotations

import gc
import json
import sys
import types
import weakref
from types import SimpleNamespace

import pytest
import sacrebleu
import torch
from torch import nn

from stcompress.errors import ModelError, StcompressError
from stcompress.metrics import comet as comet_metrics
from stcompress.metrics.comet import CometScorer
from stcompress.metrics.efficiency import Stopwatch, count_parameters, speed_report, weight_bytes
from stcompress.metrics.text import (
    METRICS,
    Score,
    available_metrics,
    corpus_score,
    corpus_scores,
    sentence_scores,
)

DE_HYP = [
    "Das Modell übersetzt die Rede ins Deutsche.",
    "Wir haben acht Schichten entfernt.",
    "Die Qualität bleibt fast gleich.",
]
DE_REF = [
    "Das Modell übersetzt die Sprache ins Deutsche.",
    "Wir entfernten acht Schichten.",
    "Die Qualität bleibt nahezu gleich.",
]
ZH_HYP = ["我们删除了八层。", "模型把英语语音翻译成中文。", "质量几乎没有变化。"]
ZH_REF = ["我们去掉了八个层。", "该模型将英语语音翻译为中文。", "质量基本保持不变。"]


# ---------------------------------------------------------------------------------------------
# sacrebleu scorers


def test_registry_names_and_sources():
    assert set(METRICS) == {"bleu", "chrf", "chrf++"}
    assert available_metrics() == ["bleu", "chrf", "chrf++", "comet"]
    assert all(spec.source for spec in METRICS.values())


def test_german_scores_equal_sacrebleu():
    scores = corpus_scores(["bleu", "chrf", "chrf++"], DE_HYP, DE_REF, "de")
    assert scores["bleu"].score == pytest.approx(sacrebleu.corpus_bleu(DE_HYP, [DE_REF]).score)
    assert scores["chrf"].score == pytest.approx(sacrebleu.corpus_chrf(DE_HYP, [DE_REF]).score)
    chrf_pp = sacrebleu.corpus_chrf(DE_HYP, [DE_REF], word_order=2).score
    assert scores["chrf++"].score == pytest.approx(chrf_pp)
    assert "tok:13a" in scores["bleu"].signature
    assert "nw:2" in scores["chrf++"].signature and "nc:6" in scores["chrf++"].signature
    assert "nw:0" in scores["chrf"].signature
    assert 0 < scores["bleu"].score < 100


def test_chinese_bleu_uses_zh_tokenizer():
    bleu = corpus_score("bleu", ZH_HYP, ZH_REF, "zh")
    zh = sacrebleu.corpus_bleu(ZH_HYP, [ZH_REF], tokenize="zh").score
    with_13a = sacrebleu.corpus_bleu(ZH_HYP, [ZH_REF], tokenize="13a").score
    assert bleu.score == pytest.approx(zh)
    assert zh != pytest.approx(with_13a)  # unspaced Chinese is one "word" per sentence for 13a
    assert "tok:zh" in bleu.signature
    chrf = corpus_score("chrf", ZH_HYP, ZH_REF, "zh")
    assert chrf.score == pytest.approx(sacrebleu.corpus_chrf(ZH_HYP, [ZH_REF]).score)


def test_multi_reference_ragged_is_padded_into_streams():
    hyps = ["the cat sat on the mat", "a dog barked loudly"]
    refs = [["the cat is on the mat", "there is a cat on the mat"], ["the dog barked loudly"]]
    score = corpus_score("bleu", hyps, refs, "en")
    streams = [["the cat is on the mat", "the dog barked loudly"], ["there is a cat on the mat", None]]
    assert score.score == pytest.approx(sacrebleu.corpus_bleu(hyps, streams).score)
    assert "nrefs:var" in score.signature
    # A second reference can only help: the best match over references counts.
    single = corpus_score("bleu", hyps, [r[0] for r in refs], "en")
    assert score.score >= single.score
    chrf = corpus_score("chrf++", hyps, refs, "en")
    assert chrf.score == pytest.approx(sacrebleu.corpus_chrf(hyps, streams, word_order=2).score)


def test_sentence_scores_equal_sacrebleu():
    got = sentence_scores("bleu", ZH_HYP, ZH_REF, "zh")
    want = [sacrebleu.sentence_bleu(h, [r], tokenize="zh").score for h, r in zip(ZH_HYP, ZH_REF)]
    assert got == pytest.approx(want)
    got = sentence_scores("chrf++", DE_HYP, [[r] for r in DE_REF], "de")
    want = [sacrebleu.sentence_chrf(h, [r], word_order=2).score for h, r in zip(DE_HYP, DE_REF)]
    assert got == pytest.approx(want)


def test_score_round_trips_through_dict():
    score = corpus_score("chrf", DE_HYP, DE_REF, "de")
    data = json.loads(json.dumps(score.to_dict()))
    assert set(data) == {"name", "score", "signature"}
    assert Score.from_dict(data) == score


def test_unknown_metric_lists_known_names():
    with pytest.raises(StcompressError, match="bleu, chrf, chrf\\+\\+, comet"):
        corpus_score("meteor", DE_HYP, DE_REF, "de")
    with pytest.raises(StcompressError, match="'meteor', 'ter'"):
        corpus_scores(["bleu", "meteor", "ter"], DE_HYP, DE_REF, "de")


def test_comet_is_known_but_not_computed_from_strings():
    with pytest.raises(StcompressError, match="CometScorer"):
        corpus_score("comet", DE_HYP, DE_REF, "de")


@pytest.mark.parametrize(
    ("hyps", "refs", "message"),
    [
        ([], [], "hypotheses: the list is empty"),
        (DE_HYP, DE_REF[:2], "references: 2 segments but 3 hypotheses"),
        (DE_HYP, [DE_REF[0], [], DE_REF[2]], r"references\[1\]: no reference"),
        ([DE_HYP[0], None, DE_HYP[2]], DE_REF, r"hypotheses\[1\]: expected a string"),
        ("one string", ["x"], "hypotheses: expected a list"),
    ],
)
def test_bad_inputs_give_one_line_errors(hyps, refs, message):
    with pytest.raises(StcompressError, match=message) as info:
        corpus_score("bleu", hyps, refs, "de")
    assert "\n" not in str(info.value) and ";" in str(info.value)


def test_unknown_language_is_reported():
    with pytest.raises(StcompressError, match="unknown language code 'xx'"):
        corpus_score("chrf", DE_HYP, DE_REF, "xx")


# ---------------------------------------------------------------------------------------------
# COMET. No COMET checkpoint exists offline, so these tests use a scorer DOUBLE: a fake model
# with the real `predict(samples, batch_size, gpus, progress_bar)` -> (.scores, .system_score)
# API. They check our wiring (scaling, src/mt/ref rows, loading, freeing), not COMET itself.


class FakeCometModel:
    """Test double of a loaded COMET model; scores a segment 1.0 when mt == ref, else 0.5."""

    def __init__(self):
        self.calls = []

    def predict(self, samples, batch_size=16, gpus=1, progress_bar=True):
        self.calls.append({"samples": samples, "batch_size": batch_size, "gpus": gpus})
        scores = [1.0 if s["mt"] == s["ref"] else 0.5 for s in samples]
        return SimpleNamespace(scores=scores, system_score=sum(scores) / len(scores))


def test_comet_double_scales_by_100_and_passes_sources():
    model = FakeCometModel()
    loaded = []
    scorer = CometScorer("Unbabel/wmt20-comet-da", batch_size=4, gpus=0,
                         loader=lambda name: loaded.append(name) or model)
    assert not scorer.loaded  # lazy: nothing loads before the first score
    srcs = ["We removed eight layers.", "The quality stays the same."]
    score, segments = scorer.score_with_segments(srcs, ["a", "b"], ["a", ["c"]])
    assert loaded == ["Unbabel/wmt20-comet-da"]
    assert score.name == "comet" and score.score == pytest.approx(75.0)
    assert segments == pytest.approx([100.0, 50.0])
    assert "model:Unbabel/wmt20-comet-da" in score.signature
    call = model.calls[0]
    assert call["batch_size"] == 4 and call["gpus"] == 0
    assert call["samples"] == [
        {"src": srcs[0], "mt": "a", "ref": "a"},
        {"src": srcs[1], "mt": "b", "ref": "c"},
    ]
    scorer.score(srcs, ["a", "b"], ["a", "b"])
    assert loaded == ["Unbabel/wmt20-comet-da"]  # loaded once


def test_comet_close_frees_the_model():
    ref = {}

    def loader(name):
        model = FakeCometModel()
        ref["model"] = weakref.ref(model)
        return model

    with CometScorer(loader=loader, gpus=0) as scorer:
        scorer.score(["src"], ["mt"], ["ref"])
        assert scorer.loaded and ref["model"]() is not None
    gc.collect()
    assert not scorer.loaded and ref["model"]() is None


def test_comet_requires_sources():
    scorer = CometScorer(loader=lambda name: FakeCometModel(), gpus=0)
    with pytest.raises(StcompressError, match="COMET needs the source transcript.*data.source_column"):
        scorer.score(["src", None], ["a", "b"], ["a", "b"])
    assert not scorer.loaded  # inputs are checked before paying for a model load


def test_comet_rejects_multi_reference_and_length_mismatch():
    scorer = CometScorer(loader=lambda name: FakeCometModel(), gpus=0)
    with pytest.raises(StcompressError, match="exactly one reference"):
        scorer.score(["s"], ["a"], [["a", "b"]])
    with pytest.raises(StcompressError, match="give one of each per segment"):
        scorer.score(["s"], ["a", "b"], ["a", "b"])


def test_missing_comet_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "comet", None)  # makes `import comet` fail even if installed
    scorer = CometScorer("Unbabel/wmt22-comet-da", gpus=0)
    with pytest.raises(StcompressError, match=r"pip install 'stcompress\[comet\]'"):
        scorer.score(["s"], ["a"], ["a"])


def test_default_loader_picks_hub_or_local_checkpoint(monkeypatch, tmp_path):
    """A fake `comet` module (a double) records whether we download or load a local .ckpt."""
    calls = []
    fake = types.ModuleType("comet")
    fake.download_model = lambda name: calls.append(("download", name)) or "/cache/model.ckpt"
    fake.load_from_checkpoint = lambda path: calls.append(("load", path)) or FakeCometModel()
    monkeypatch.setitem(sys.modules, "comet", fake)

    comet_metrics._load_comet_model("Unbabel/wmt22-comet-da")
    assert calls == [("download", "Unbabel/wmt22-comet-da"), ("load", "/cache/model.ckpt")]

    ckpt = tmp_path / "wmt22" / "checkpoints" / "model.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"x")
    calls.clear()
    comet_metrics._load_comet_model(str(tmp_path / "wmt22"))
    assert calls == [("load", str(ckpt))]
    with pytest.raises(StcompressError, match="does not exist"):
        comet_metrics._load_comet_model(str(tmp_path / "missing.ckpt"))
    with pytest.raises(StcompressError, match="no checkpoints/model.ckpt"):
        comet_metrics._load_comet_model(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# Efficiency


def _tiny_fp_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16, bias=False))


def test_count_parameters_plain_and_trainable():
    model = _tiny_fp_model()
    assert count_parameters(model) == 64 * 32 + 32 + 32 * 16
    model[0].requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == 32 * 16


def test_count_parameters_counts_tied_weights_once():
    emb = nn.Embedding(10, 8)
    head = nn.Linear(8, 10, bias=False)
    head.weight = emb.weight
    assert count_parameters(nn.ModuleList([emb, head])) == 80


@pytest.mark.filterwarnings("ignore")
def test_count_parameters_bitsandbytes_4bit_equals_fp_model():
    bnb = pytest.importorskip("bitsandbytes")
    fp = _tiny_fp_model()
    q = nn.Sequential(
        bnb.nn.Linear4bit(64, 32, quant_type="nf4", compute_dtype=torch.float32),
        nn.ReLU(),
        bnb.nn.Linear4bit(32, 16, bias=False, quant_type="nf4", compute_dtype=torch.float32),
    )
    q.load_state_dict(fp.state_dict())
    q = q.to("cpu")  # moving Params4bit to a device is what quantizes it (CPU works in bnb >= 0.45)
    packed = q[0].weight
    assert packed.dtype == torch.uint8 and packed.numel() == 64 * 32 // 2  # two weights per byte
    assert count_parameters(q) == count_parameters(fp)
    assert sum(p.numel() for p in q.parameters()) < count_parameters(fp)  # the paper's miscount
    with torch.no_grad():  # still the same function, up to NF4 error
        x = torch.randn(4, 64)
        assert torch.allclose(q(x), fp(x), atol=0.5)


def test_weight_bytes_counts_weight_files_only(tmp_path):
    from safetensors.torch import save_file

    model = _tiny_fp_model()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    (tmp_path / "config.json").write_text("{}" * 100)
    torch.save({"lr": 1e-5}, tmp_path / "training_args.bin")  # trainer state, not weights
    want = (tmp_path / "model.safetensors").stat().st_size + (tmp_path / "model.safetensors.index.json").stat().st_size
    assert weight_bytes(tmp_path) == want
    assert weight_bytes(tmp_path) > 4 * count_parameters(model)  # fp32 plus a small header


def test_weight_bytes_errors(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="no weight files"):
        weight_bytes(tmp_path)
    with pytest.raises(ModelError, match="not a directory"):
        weight_bytes(tmp_path / "nope")


def test_stopwatch_and_speed_report_on_cpu():
    with Stopwatch("cpu") as sw:
        sum(range(10000))
    assert sw.seconds > 0
    assert sw.peak_gpu_bytes is None
    report = sw.report(n_segments=10, n_generated_tokens=200)
    assert report["segments_per_s"] == pytest.approx(10 / sw.seconds)
    assert report["tokens_per_s"] == pytest.approx(200 / sw.seconds)
    report = speed_report(2.0, 10, None, 3 * 2**30)
    assert report["segments_per_s"] == 5.0 and report["tokens_per_s"] is None
    assert report["peak_gpu_gib"] == 3.0
    assert speed_report(0.0, 10)["segments_per_s"] is None
    json.dumps(report)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_stopwatch_records_peak_gpu_memory():
    with Stopwatch("cuda") as sw:
        x = torch.empty(256, 1024, 1024, dtype=torch.uint8, device="cuda")
        del x
    assert sw.peak_gpu_bytes >= 256 * 2**20
