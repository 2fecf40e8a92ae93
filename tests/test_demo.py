"""The offline demo: its trimmed vocabulary, its built-in data, and the whole demo end to end (the
end-to-end test of every stage together, on a model that really learns)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import transformers

from stcompress import cli
from stcompress.artifacts import read_manifest
from stcompress.config import DataConfig
from stcompress.data.sources import load_examples
from stcompress.errors import DataError
from stcompress.model.tokenizer import bpe_steps, build_qwen2_audio_tokenizer, special_tokens, token_ids, trim_ranks

# ---------------------------------------------------------------------------------------------
# Trimmed vocabulary


def test_trim_ranks_keeps_every_merge_step_and_renumbers_in_order():
    ranks = {bytes([b]): b for b in range(256)}
    for token in (b"ab", b"cd", b"abc", b"abcd", b"xy", b"bc"):
        ranks[token] = len(ranks)
    # "abcd": a+b (256) first; then cd (257) beats abc (258); then ab+cd -> abcd. "abc", "bc" and
    # "xy" are never made on the way, so the trimmed vocabulary drops them.
    assert bpe_steps(b"abcd", ranks) == [b"ab", b"cd", b"abcd"]
    trimmed = trim_ranks(ranks, {b"abcd"})
    assert set(trimmed) == {bytes([b]) for b in range(256)} | {b"ab", b"cd", b"abcd"}
    assert sorted(trimmed, key=trimmed.__getitem__)[256:] == [b"ab", b"cd", b"abcd"]
    assert sorted(trimmed.values()) == list(range(259))
    assert bpe_steps(b"abcd", trimmed) == [b"ab", b"cd", b"abcd"]  # same steps with the subset
    with pytest.raises(ValueError, match="not a token"):
        trim_ranks(ranks, {b"zzz"})


def test_trimmed_tokenizer_encodes_its_texts_like_the_full_one():
    texts = ["Das kleine Modell ist schnell.", "小模型很快。", "Translate the English speech into German:"]
    full = build_qwen2_audio_tokenizer()
    small = build_qwen2_audio_tokenizer(texts)
    assert len(small) < 1000 < 151_000 < len(full)
    for text in texts:
        assert small.tokenize(text) == full.tokenize(text)
    # any other text is still encodable (byte by byte at worst) and decodes back
    other = "Quantenchromodynamik 量子色动力学"
    assert small.decode(small(other)["input_ids"]) == other
    specials = special_tokens(len(small) - 6)
    assert {t: small.convert_tokens_to_ids(t) for t in specials} == specials
    assert token_ids(small) == {"pad": specials["<|endoftext|>"], "eos": specials["<|im_end|>"], "audio": specials["<|AUDIO|>"]}


# ---------------------------------------------------------------------------------------------
# Built-in data


def test_demo_datasets_split_voices_and_sentences():
    sets = {name: load_examples(DataConfig(dataset=f"builtin:demo-{name}", subset="all"), require_references=True).examples
            for name in ("train", "dev", "kd", "test")}
    assert {k: len(v) for k, v in sets.items()} == {"train": 300, "dev": 24, "kd": 100, "test": 120}
    voice = {k: {ex.id.split("-")[1] for ex in v} for k, v in sets.items()}
    assert voice == {"train": {"joe", "awb", "rms"}, "dev": {"kal16"}, "kd": {"kal16"}, "test": {"slt"}}
    train_sentences = {ex.id.split("-")[0] for ex in sets["train"]}
    assert len(train_sentences) == 100 and sum(ex.id.split("-")[0] not in train_sentences for ex in sets["test"]) == 20
    for ex in sets["test"][:5]:
        assert ex.audio.dtype == np.float32 and 0.5 < len(ex.audio) / 16000 < 10 and np.abs(ex.audio).max() > 0.05
        assert ex.references[0] and ex.source
    zh = load_examples(DataConfig(dataset="builtin:demo-test", target_lang="zh", subset="all")).examples
    assert re.search(r"[\u4e00-\u9fff]", zh[0].references[0])
    with pytest.raises(DataError, match="unknown built-in dataset 'builtin:nope'"):
        load_examples(DataConfig(dataset="builtin:nope"))


# ---------------------------------------------------------------------------------------------
# The demo, end to end


def _table(report_md: Path) -> dict[str, dict[str, str]]:
    """The report's first table (the language's model table), by model name."""
    lines = report_md.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| model / stage"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[start:end]]
    return {row[0].split(" ")[0]: dict(zip(cells[0], row)) for row in cells[2:]}


def _number(text: str) -> float:
    return float(text.replace(",", "").split()[0])


def test_demo_runs_every_stage_and_reports_real_numbers(tmp_path, capsys):
    run_dir = tmp_path / "demo"
    assert cli.main(["demo", "-q", "--run-dir", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "What it is not" in out and "report.html" in out
    stages = ["teacher", "teacher-eval", "importance", "prune", "pruned-eval", "distill", "student", "heal",
              "export", "final-eval", "report"]
    for name in stages:
        assert read_manifest(run_dir / name)["stage"] in {"finetune", "evaluate", "importance", "prune", "distill", "export", "report"}
    rows = _table(run_dir / "report" / "report.md")
    assert set(rows) == {"teacher-eval", "pruned-eval", "final-eval"}
    teacher, pruned, final = (rows[k] for k in ("teacher-eval", "pruned-eval", "final-eval"))
    assert [int(r["LM layers"]) for r in (teacher, pruned, final)] == [4, 2, 2]
    assert _number(teacher["parameters"]) > _number(final["parameters"]) > 0
    # The teacher learned the task (a random decoder scores ~15 chrF++ here) and compression kept
    # most of it; every model translated at a measured speed.
    assert _number(teacher["chrF++"]) > 60
    for r in (pruned, final):
        assert _number(r["chrF++"]) > 0.8 * _number(teacher["chrF++"])
        assert _number(r["% of teacher (chrF++)"]) == pytest.approx(100 * _number(r["chrF++"]) / _number(teacher["chrF++"]), abs=0.2)
    assert all(0 < _number(r["segments/s"]) for r in rows.values()) and all(_number(r["BLEU"]) > 0 for r in rows.values())
    scores = json.loads((run_dir / "demo_scores.json").read_text())
    assert [p["model"] for p in scores["seen_vs_new"]] == ["teacher-eval", "pruned-eval", "final-eval"]
    assert all(p["n_seen"] == 100 and p["n_new"] == 20 and p["seen"] > p["new"] for p in scores["seen_vs_new"])
    # KD data came from the teacher alone; healing trained LoRA on a 4-bit base with the tower kept
    distill = read_manifest(run_dir / "distill")
    assert distill["counts"]["teacher_kept"] == 100 and distill["counts"]["references"] == 0
    assert read_manifest(run_dir / "heal")["mode"] == "qlora"
    # The exported model loads with plain from_pretrained.
    model = transformers.Qwen2AudioForConditionalGeneration.from_pretrained(str(run_dir / "export"))
    assert model.config.text_config.num_hidden_layers == 2
    # A second demo skips every finished stage.
    assert cli.main(["demo", "-q", "--run-dir", str(run_dir)]) == 0
    plan_out = capsys.readouterr().out
    assert plan_out.count("[skip: unchanged]") == len(stages)
