"""`stcompress sweep`: precisions, the grid, storage bins, the Pareto frontier, and a 2x2 sweep end to end."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from stcompress import cli
from stcompress.artifacts import read_manifest
from stcompress.config import DataConfig, GenerationConfig, SweepConfig, load_config
from stcompress.errors import ConfigError, StcompressError
from stcompress.stages import report, sweep


def test_parse_precision():
    assert sweep.parse_precision("bf16") == ("none", "")
    assert sweep.parse_precision("nf4") == ("nf4", "")
    assert sweep.parse_precision("int8:lm_head=8") == ("int8", "lm_head=8")
    assert sweep.parse_precision("hqq3:lm_head=8") == ("hqq", "decoder_layers=3,audio_tower=3,projector=3,lm_head=8")
    for bad in ("fp8", "nf44", "int4", "hqq:"):
        with pytest.raises(ValueError, match="precisions: .* is not bf16, int8, nf4, hqq or hqqN"):
            sweep.parse_precision(bad)
    with pytest.raises(ConfigError) as exc:
        load_config(SweepConfig, {"run_dir": "r", "input": "m", "precisions": "bf16,nf4:decoder_layers=3,hqq9,gptq"})
    problems = "\n".join(exc.value.problems)
    assert "precisions: nf4:decoder_layers=3: bits: decoder_layers=3 is not stored by quantize nf4" in problems
    assert "precisions: hqq9: bits: decoder_layers=9 is not stored by quantize hqq" in problems
    assert "precisions: 'gptq' is not bf16" in problems


def test_storage_bins_include_their_upper_edge():
    assert report.storage_bin(150_000_000) == "<200 MB"
    assert report.storage_bin(200_000_000) == "<200 MB"
    assert report.storage_bin(200_000_001) == "200-500 MB"
    assert report.storage_bin(999_999_999) == "0.5-1 GB"
    assert report.storage_bin(2_000_000_000) == "1-2 GB"
    assert report.storage_bin(4_000_000_000) == "2-4 GB"
    assert report.storage_bin(4_000_000_001) == "> 4 GB"


def test_frontier():
    points = [(100, 50.0), (200, 60.0), (150, 40.0), (300, 60.0), (50, None), (None, 70.0), (100, 50.0)]
    # (150, 40) is beaten by (100, 50); (300, 60) by (200, 60); missing values are never on it; equal points both are
    assert report.frontier(points) == [True, True, False, False, False, False, True]
    assert report.frontier([]) == []


def _row(name: str, split: str | None, lang: str = "de") -> report.Row:
    return report.Row(name=name, lang=lang, scores={"chrf": {"score": 50.0}}, model={}, speed={}, segments=1, split=split)


def test_groups_split_dev_and_test_only_when_both_exist():
    rows = [_row("a-dev", "dev"), _row("a-test", "test"), _row("b-dev", "dev"), _row("z", "test", "zh")]
    assert {k: [r.name for r in v] for k, v in report.groups(rows).items()} == {
        "de-dev": ["a-dev", "b-dev"], "de-test": ["a-test"], "zh": ["z"]}
    assert list(report.groups([_row("a", "test"), _row("b", "test")])) == ["de"]


def _importance(root: Path, order: list[int]) -> Path:
    d = root / "importance"
    d.mkdir(exist_ok=True)
    (d / "manifest.json").write_text(json.dumps({"stage": "importance", "config": {"component": "decoder"},
                                                 "removal_order": order, "model": {"decoder_layers": 4}}))
    return d


def _sweep_cfg(tmp_path: Path, model: Path, **kw) -> SweepConfig:
    data = dict(target_lang="de", limit=2)
    fields = dict(run_dir=str(tmp_path / "run"), input=str(model), importance=str(_importance(tmp_path, [2, 1])),
                  layers=(4, 3), precisions=("bf16", "nf4"), device="cpu", check_segments=1,
                  dev=DataConfig(dataset="builtin:demo-dev", **data), test=DataConfig(dataset="builtin:demo-test", **data),
                  generation=GenerationConfig(max_new_tokens=4, batch_size=2))
    return SweepConfig(**(fields | kw))


def test_grid_names_and_layers(tmp_path, tiny_model_dir):
    cfg = _sweep_cfg(tmp_path, tiny_model_dir, layers=(4, 2), precisions=("bf16", "hqq3:lm_head=8"))
    points = sweep.grid(cfg, *sweep._layers(cfg))
    assert [(p.name, p.num_layers) for p in points] == [
        ("L4-bf16", None), ("L4-hqq3-lm_head8", None), ("L2-bf16", 2), ("L2-hqq3-lm_head8", 2)]
    with pytest.raises(ConfigError, match="layers: 5 kept decoder layers cannot be made from the 4-layer input; "
                                          "the importance order reaches 4, 3, 2"):
        sweep.grid(_sweep_cfg(tmp_path, tiny_model_dir, layers=(5,)), 4, [2, 1], [0, 1, 2, 3])
    with pytest.raises(ConfigError, match="give --importance"):
        sweep.grid(_sweep_cfg(tmp_path, tiny_model_dir, importance=None), 4, [], [0, 1, 2, 3])
    recipe = sweep.recipe(cfg, points)
    assert [s["name"] for s in recipe["stages"][:3]] == ["L4-bf16", "L4-bf16-dev", "L4-bf16-test"]
    assert recipe["stages"][-1]["stage"] == "report"
    hqq_eval = next(s for s in recipe["stages"] if s["name"] == "L2-hqq3-lm_head8-dev")
    assert hqq_eval["config"]["model"] == {"path": "${L2-hqq3-lm_head8}", "device": "cpu", "dtype": "float32"}


def test_trimmed_candidates_export_with_a_trimmed_vocabulary(tmp_path, tiny_model_dir):
    """trim: [false, true] doubles the grid; the -trim candidates' exports set trim_vocab, and the
    generated recipe validates as export configs (nothing runs)."""
    from stcompress.stages import run as runner

    cfg = _sweep_cfg(tmp_path, tiny_model_dir, trim=(False, True))
    points = sweep.grid(cfg, *sweep._layers(cfg))
    data = sweep.recipe(cfg, points)
    exports = {st["name"]: st["config"] for st in data["stages"] if st["stage"] == "export"}
    assert len(exports) == 2 * len([p for p in points if not p.trim]) and any(n.endswith("-trim") for n in exports)
    assert all(c.get("trim_vocab", False) == n.endswith("-trim") for n, c in exports.items())
    parsed = runner.parse_recipe(tmp_path / "sweep.yaml", data)
    trimmed = [s.config.trim_vocab for s in parsed.steps if s.name in exports]
    assert sorted(trimmed) == sorted(n.endswith("-trim") for n in exports)


def test_sweep_2x2_end_to_end_resumes_and_binds_content(tmp_path, tiny_model_dir, capsys):
    cfg = _sweep_cfg(tmp_path, tiny_model_dir)
    run_dir = sweep.run(cfg, progress=False)
    names = ["L4-bf16", "L4-nf4", "L3-bf16", "L3-nf4"]
    record = json.loads((run_dir / "sweep.json").read_text())
    assert [c["name"] for c in record["candidates"]] == names and record["redo"] is False
    for name in names:
        exported = read_manifest(run_dir / name)
        assert exported["model"]["decoder_layers"] == int(name[1])
        assert exported["measured_bytes"]["safetensors"] > 0 and exported["measured_bytes"]["torch_save"] > 0
        for split in ("dev", "test"):
            assert json.loads((run_dir / f"{name}-{split}" / "scores.json").read_text())["scores"]["chrf"]
    md = (run_dir / "report" / "report.md").read_text()
    table = md.split("## Pareto sweep: every candidate")[1].split("\n\n")[1].splitlines()
    assert table[0].startswith("| candidate | LM layers | precision | vocabulary | *.safetensors | torch.save | bin | dev chrF |")
    assert "dev frontier (chrF++)" in table[0] and "test frontier (chrF++)" in table[0]
    assert [line.split(" | ")[0].lstrip("| ") for line in table[2:]] == names
    assert all("<200 MB" in line for line in table[2:])
    assert any("★" in line for line in table[2:])
    assert (run_dir / "report" / "quality_vs_size_de-demo-dev.png").is_file()
    assert (run_dir / "report" / "quality_vs_size_de-demo-test.png").is_file()
    # A second run skips every finished candidate (the run machinery's plan.json)
    stamps = {n: os.stat(run_dir / n / "manifest.json").st_mtime_ns for n in names}
    capsys.readouterr()
    sweep.run(cfg, progress=False)
    plan = capsys.readouterr().out
    assert plan.count("[skip: unchanged]") == 13, plan  # 4 exports, 8 evaluations, the report
    assert stamps == {n: os.stat(run_dir / n / "manifest.json").st_mtime_ns for n in names}
    # Other content at the same input path: refused, naming the input and the fix
    _importance(tmp_path, [1, 2])
    rc = cli.main(["sweep", "--config", str(_yaml(tmp_path, cfg))])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("stcompress sweep: error: importance: its content differs from what this sweep "
                                          "used") and "--restart" in err[-1]


def _yaml(tmp_path: Path, cfg: SweepConfig) -> Path:
    import yaml

    from stcompress.config import to_dict

    path = tmp_path / "sweep-config.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    return path


def test_an_interrupted_redo_is_redone(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    found = {"input": {"sha256": "a"}}
    assert sweep._check_content(run_dir, found, restart=False) is False  # no record yet
    (run_dir / "sweep.json").write_text(json.dumps({"inputs": found, "redo": False}))
    assert sweep._check_content(run_dir, found, restart=False) is False
    with pytest.raises(StcompressError, match="input: its content differs"):
        sweep._check_content(run_dir, {"input": {"sha256": "b"}}, restart=False)
    assert sweep._check_content(run_dir, {"input": {"sha256": "b"}}, restart=True) is True
    (run_dir / "sweep.json").write_text(json.dumps({"inputs": found, "redo": True}))  # killed during a redo
    assert sweep._check_content(run_dir, found, restart=False) is True
