"""End to end through the CLI: translate and evaluate on the built-in example and a local manifest."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from stcompress import cli
from stcompress.artifacts import read_manifest

FAST = ["--generation.max-new-tokens", "6", "--generation.batch-size", "4", "-q"]


def _tiny(tiny_model_dir) -> list[str]:
    return ["--model.path", str(tiny_model_dir)]


def _manifest(tmp_path: Path, make_wav, n: int = 3, bad: dict | None = None) -> Path:
    rows = []
    for i in range(n):
        wav = make_wav(f"clip{i}.wav", seconds=1.0 + i)
        rows.append({"id": f"utt{i}", "audio": wav.name, "text_en": f"sentence {i}", "text_de": f"Satz {i}"})
    if bad:
        rows.append(bad)
    path = tmp_path / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("command", ["translate", "evaluate"])
def test_help_for_each_subcommand(command):
    out = subprocess.run([sys.executable, "-m", "stcompress", command, "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "--generation.max-new-tokens" in out.stdout and "--data.target-lang" in out.stdout


def test_top_level_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "stcompress", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "translate" in out.stdout and "evaluate" in out.stdout


def test_print_config(capsys):
    assert cli.main(["translate", "--print-config", "--data.target-lang", "zh"]) == 0
    out = capsys.readouterr().out
    assert "target_lang: zh" in out and "max_new_tokens: 256" in out


def test_translate_builtin_then_evaluate_file(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "tr"
    args = ["translate", *_tiny(tiny_model_dir), "--data.limit", "3", "--output", str(out), *FAST]
    assert cli.main(args) == 0
    rows = [json.loads(line) for line in (out / "hypotheses.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["builtin-001", "builtin-002", "builtin-003"]
    assert all(r["references"] and r["target_lang"] == "de" and 1 <= r["n_tokens"] <= 6 for r in rows)
    manifest = read_manifest(out)
    assert manifest["stage"] == "translate"
    assert manifest["config"]["generation"]["max_new_tokens"] == 6
    assert manifest["inputs"]["model"]["sha256"] and manifest["inputs"]["data"]["sha256"]
    assert manifest["versions"]["transformers"] and manifest["timings"]["translate"] > 0
    assert manifest["model"]["decoder_layers"] == 4 and manifest["model"]["parameters"] > 0
    assert "Translate the English speech into German:" in manifest["prompt"]
    assert not list(tmp_path.glob(".tr.partial-*"))

    ev = tmp_path / "ev"
    assert cli.main(["evaluate", "--hypotheses", str(out), "--output", str(ev), "-q"]) == 0
    scores = json.loads((ev / "scores.json").read_text())
    assert set(scores["scores"]) == {"bleu", "chrf", "chrf++"}
    assert "tok:13a" in scores["scores"]["bleu"]["signature"] and "nw:2" in scores["scores"]["chrf++"]["signature"]
    assert scores["model"]["parameters"] == manifest["model"]["parameters"]  # carried, not recomputed
    printed = capsys.readouterr().out
    assert "chrf++" in printed and "segments: 3" in printed


def test_evaluate_with_model_on_manifest_zh(tmp_path, tiny_model_dir, make_wav):
    rows = [{"id": "a", "audio": make_wav("a.wav", seconds=1.5).name, "text_zh": "你好世界"}]
    manifest = tmp_path / "zh.jsonl"
    manifest.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    ev = tmp_path / "ev"
    args = ["evaluate", *_tiny(tiny_model_dir), "--data.dataset", str(manifest), "--data.target-lang", "zh"]
    assert cli.main([*args, "--output", str(ev), *FAST]) == 0
    scores = json.loads((ev / "scores.json").read_text())
    assert scores["target_lang"] == "zh" and "tok:zh" in scores["scores"]["bleu"]["signature"]
    assert (ev / "hypotheses.jsonl").is_file() and read_manifest(ev)["stage"] == "evaluate"


def test_skip_lists_bad_items(tmp_path, tiny_model_dir, make_wav, capsys):
    manifest = _manifest(tmp_path, make_wav, bad={"id": "broken", "audio": "nowhere.wav", "text_de": "x"})
    out = tmp_path / "tr"
    base = ["translate", *_tiny(tiny_model_dir), "--data.dataset", str(manifest), "--output", str(out), *FAST]
    assert cli.main(base) == 2
    err = capsys.readouterr().err
    assert "broken" in err and "nowhere.wav" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    assert cli.main([*base, "--on-error", "skip"]) == 0
    assert [json.loads(x)["id"] for x in (out / "skipped.jsonl").read_text().splitlines()] == ["broken"]
    assert read_manifest(out)["skipped"] == ["broken"]
    assert len((out / "hypotheses.jsonl").read_text().splitlines()) == 3


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--data.target-lang", "xx"], "data.target_lang: unknown language code 'xx'"),
        (["--model.device", "cuda"], "model.device: cuda was asked for but no CUDA device is available"),
        (["--model.attn-implementation", "flash_attention_2"], "flash_attention_2 needs a CUDA device"),
        (["--data.dataset", "missing/dir/manifest.jsonl"], "missing/dir/manifest.jsonl"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, tiny_model_dir, capsys, extra, expected):
    code = cli.main(["translate", *_tiny(tiny_model_dir), "--output", str(tmp_path / "o"), *FAST, *extra])
    err = capsys.readouterr().err
    assert code == 2 and expected in err and "Traceback" not in err


def test_model_dir_missing_files(tmp_path, capsys):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    assert cli.main(["translate", "--model.path", str(model_dir), "--output", str(tmp_path / "o"), "-q"]) == 2
    err = capsys.readouterr().err
    assert f"model.path: {model_dir} has no weight files" in err


def test_interrupted_run_leaves_nothing_complete(tmp_path, tiny_model_dir, monkeypatch, capsys):
    from stcompress.translate import Translator

    out = tmp_path / "tr"

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Translator, "translate", interrupted)
    assert cli.main(["translate", *_tiny(tiny_model_dir), "--output", str(out), *FAST]) == 130
    assert not out.exists() and not list(tmp_path.iterdir())
    assert "no output was marked complete" in capsys.readouterr().err


def test_yaml_config_file(tmp_path, tiny_model_dir):
    cfg = tmp_path / "cfg.yaml"
    out = tmp_path / "tr"
    cfg.write_text(
        f"output: {out}\nmodel:\n  path: {tiny_model_dir}\ndata:\n  limit: 2\n  target_lang: zh\n"
        "generation:\n  max_new_tokens: 4\n"
    )
    assert cli.main(["translate", "--config", str(cfg), "-q"]) == 0
    rows = (out / "hypotheses.jsonl").read_text().splitlines()
    assert len(rows) == 2 and json.loads(rows[0])["target_lang"] == "zh"
    assert "Chinese" in read_manifest(out)["prompt"]


def test_outputs_are_readable_by_others(tmp_path, tiny_model_dir):
    import os

    out = tmp_path / "tr"
    previous = os.umask(0o022)
    try:
        code = cli.main(["translate", *_tiny(tiny_model_dir), "--data.limit", "1", "--output", str(out), *FAST])
    finally:
        os.umask(previous)
    assert code == 0
    assert out.stat().st_mode & 0o055 == 0o055 and (out / "manifest.json").stat().st_mode & 0o044 == 0o044
