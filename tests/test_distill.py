"""`stcompress distill`: KD rows (dedup, filter, upsampling), the output contract, load_distilled."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from stcompress.artifacts import read_jsonl, read_manifest
from stcompress.config import DataConfig, DistillConfig, GenerationConfig, ModelConfig, load_config
from stcompress.data.audio import load_audio
from stcompress.data.distilled import load_distilled
from stcompress.data.sources import load_examples
from stcompress.errors import ConfigError, DataError
from stcompress.metrics.text import sentence_scores
from stcompress.stages import distill
from stcompress.stages.distill import kd_rows

GEN = GenerationConfig(max_new_tokens=6, batch_size=4)


def _hyp(i, hyp, *refs):
    return {"id": f"s{i}", "hypothesis": hyp, "references": list(refs), "target_lang": "de"}


def test_kd_rows_dedup_whitespace_and_empty():
    rows = [
        _hyp(0, "Guten  Morgen", "Guten Morgen "),  # duplicate after whitespace normalisation
        _hyp(1, "Hallo Welt", "Hallo, Welt!"),
        _hyp(2, "", "Leer"),  # empty teacher output
        _hyp(3, "Zwei", "Zwei", "Zwei  ", "Drei"),  # repeated reference kept once; teacher duplicates one
    ]
    out, counts = kd_rows(rows, DistillConfig())
    assert counts == {"examples": 4, "references": 5, "teacher": 4, "empty": 1, "duplicates": 2, "filtered": 0,
                      "teacher_kept": 1, "rows": 6}
    assert [(r["id"], r["origin"]) for r in out] == [
        ("s0:ref", "reference"), ("s1:ref", "reference"), ("s1:kd", "teacher"), ("s2:ref", "reference"),
        ("s3:ref", "reference"), ("s3:ref1", "reference"),
    ]
    assert [r["target"] for r in out if r["source_id"] == "s3"] == ["Zwei", "Drei"]


def test_kd_rows_filter_upsample_teacher_only():
    rows = [_hyp(0, "Das ist ein kleiner Test.", "Das ist ein kleiner Test!"), _hyp(1, "xyz qqq", "Ganz anders formuliert.")]
    out, counts = kd_rows(rows, DistillConfig(min_score=50, upsample=3))
    assert (counts["filtered"], counts["teacher_kept"], counts["rows"]) == (1, 1, 2 + 3)
    kd = [r for r in out if r["origin"] == "teacher"]
    assert [r["id"] for r in kd] == ["s0:kd", "s0:kd1", "s0:kd2"] and all(r["score"] > 50 for r in kd)
    only, counts = kd_rows([_hyp(0, "Guten Morgen", "Guten Morgen")], DistillConfig(teacher_only=True))
    assert [r["origin"] for r in only] == ["teacher"] and counts["duplicates"] == 0 and counts["references"] == 0


def test_config_problems_reported_together():
    with pytest.raises(ConfigError) as err:
        load_config(DistillConfig, {"upsample": 0, "filter_metric": "comet", "min_score": 120, "model": {"path": "x/y"}})
    assert len(err.value.problems) == 3 and "upsample" in str(err.value) and "filter_metric" in str(err.value)


@pytest.fixture
def tiny_outputs(tiny_model_dir, make_wav, tmp_path):
    """Four clips and what the tiny model (the teacher) says for them."""
    from stcompress.model.load import load_model
    from stcompress.translate import Translator

    root = tmp_path
    clips = [make_wav(f"clip{i}.wav", seconds=s, seed=10 + i) for i, s in enumerate((1.5, 2.0, 2.5, 3.0))]
    rows = [{"id": f"utt{i}", "audio": p.name, "text_de": "x"} for i, p in enumerate(clips)]
    (root / "probe.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = load_examples(DataConfig(dataset=str(root / "probe.jsonl"))).examples
    loaded = load_model(ModelConfig(path=str(tiny_model_dir), device="cpu"))
    hyps = Translator(loaded.model, loaded.processor, generation=GEN, progress=False).translate(examples)
    return root, clips, [h.text for h in hyps]


def _kd_manifest(root: Path, clips, outputs) -> Path:
    refs = [
        f"  {outputs[0]} ",  # the teacher's own output: a duplicate
        outputs[1].replace(" ", "  "),  # the same after whitespace normalisation: a duplicate
        outputs[2] + " und so weiter",  # close to the teacher's output: kept by the filter
        "Das ist ein völlig anderer Satz über Sprachmodelle.",  # far from it: filtered
    ]
    rows = [{"id": f"utt{i}", "audio": p.name, "text_en": f"sentence {i}", "text_de": r}
            for i, (p, r) in enumerate(zip(clips, refs))]
    path = root / "train.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def _full_finetune_output(root: Path, model_dir: Path) -> Path:
    """A teacher as `stcompress finetune --mode full` leaves it: model/ plus a manifest."""
    ft = root / "teacher"
    (ft / "model").mkdir(parents=True)
    for f in model_dir.iterdir():
        os.symlink(f, ft / "model" / f.name)
    prompt = {"system": "You are a translator.", "instruction": "Translate the English speech into {language}:"}
    (ft / "manifest.json").write_text(json.dumps({"stage": "finetune", "mode": "full", "prompt_config": prompt}))
    return ft


def test_distill_end_to_end_and_load_distilled(tiny_model_dir, tiny_outputs, tmp_path, caplog):
    root, clips, outputs = tiny_outputs
    assert len(set(outputs)) == 4 and all(outputs)
    manifest_path = _kd_manifest(root, clips, outputs)
    far = "Das ist ein völlig anderer Satz über Sprachmodelle."
    scores = sentence_scores("chrf", outputs[2:], [[outputs[2] + " und so weiter"], [far]], "de")
    assert scores[0] > 50 > scores[1]
    teacher = _full_finetune_output(tmp_path, Path(tiny_model_dir))
    cfg = DistillConfig(
        output=str(tmp_path / "distill"), min_score=50, model=ModelConfig(path=str(teacher), device="cpu"),
        data=DataConfig(dataset=str(manifest_path), subset="all"), generation=GEN,
    )
    with caplog.at_level(logging.WARNING):
        out = distill.run(cfg, progress=False)
    assert "differs from the one the teacher" in caplog.text  # trained with another system prompt

    manifest = read_manifest(out)
    assert manifest["stage"] == "distill"
    assert manifest["counts"] == {"examples": 4, "references": 4, "teacher": 4, "empty": 0, "duplicates": 2,
                                  "filtered": 1, "teacher_kept": 1, "rows": 5, "upsample": 1, "skipped": 0}
    assert manifest["config"]["data"]["dataset"] == str(manifest_path)
    assert "Translate the English speech into German:" in manifest["prompt"]
    assert manifest["model"]["path"] == str((teacher / "model").resolve())
    hyps = read_jsonl(out / "hypotheses.jsonl")
    assert [h["hypothesis"] for h in hyps] == outputs  # the teacher's raw outputs, translate's format
    assert {"id", "hypothesis", "references", "source", "target_lang", "n_tokens"} <= hyps[0].keys()
    rows = read_jsonl(out / "examples.jsonl")
    assert [(r["source_id"], r["origin"]) for r in rows] == [
        ("utt0", "reference"), ("utt1", "reference"), ("utt2", "reference"), ("utt2", "teacher"), ("utt3", "reference"),
    ]
    assert len({r["id"] for r in rows}) == len(rows)

    pairs = load_distilled(out)
    assert [t for _, t in pairs] == [r["target"] for r in rows]
    assert [ex.id for ex, _ in pairs] == [r["source_id"] for r in rows]
    assert pairs[2][0] is pairs[3][0]  # one Example (one audio array) per clip
    np.testing.assert_array_equal(pairs[4][0].audio, load_audio(clips[3]))

    clips[3].unlink()  # the audio of one example disappears
    with pytest.raises(DataError, match="utt3"):
        load_distilled(out)
    assert [ex.id for ex, _ in load_distilled(out, on_error="skip")] == ["utt0", "utt1", "utt2", "utt2"]


def test_load_distilled_rejects_other_outputs(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"stage": "translate", "config": {}}))
    with pytest.raises(DataError, match="not a distill output"):
        load_distilled(tmp_path)
    with pytest.raises(DataError, match="no manifest.json"):
        load_distilled(tmp_path / "missing")
