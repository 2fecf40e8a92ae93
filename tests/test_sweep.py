"""`stcompress sweep`: precisions, the grid, storage bins, the Pareto frontier, and a 2x2 sweep end to end."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from stcompress import cli
from stcompress.artifacts import read_manifest
from stcompress.config import DataConfig, GenerationConfig, SweepConfig, VocabConfig, load_config
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
    assert not any("vocab" in c for c in exports.values())  # unset: each input's upstream training data


def test_sweep_vocab_options_reach_the_trimmed_exports_only(tmp_path, tiny_model_dir):
    """--vocab.* (one set of kept texts for every input) goes into the trimmed candidates' export
    configs and nowhere else; given without a trimmed candidate it is refused before anything runs."""
    from stcompress.stages import run as runner

    vocab = VocabConfig(references=("builtin:demo-train",), keep_first=300)
    cfg = _sweep_cfg(tmp_path, tiny_model_dir, trim=(False, True), vocab=vocab)
    data = sweep.recipe(cfg, sweep.grid(cfg, *sweep._layers(cfg)))
    exports = {st["name"]: st["config"] for st in data["stages"] if st["stage"] == "export"}
    assert {n: c.get("vocab") for n, c in exports.items() if n.endswith("-trim")} == {
        n: {"datasets": [], "distilled": [], "references": ["builtin:demo-train"], "keep_first": 300}
        for n in exports if n.endswith("-trim")}
    assert all("vocab" not in c for n, c in exports.items() if not n.endswith("-trim"))
    parsed = runner.parse_recipe(tmp_path / "sweep.yaml", data)
    assert {s.config.vocab for s in parsed.steps if s.name in exports and s.name.endswith("-trim")} == {vocab}
    with pytest.raises(ConfigError, match="vocab: applies to trimmed candidates only"):
        sweep.run(_sweep_cfg(tmp_path, tiny_model_dir, vocab=vocab))


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


# -- several inputs: healed students at their own depth beside `input`'s grid ----------------------

def test_bad_inputs_are_refused_in_one_line_before_any_work(tmp_path, capsys):
    def problems(**kw) -> list[str]:
        with pytest.raises(ConfigError) as exc:
            load_config(SweepConfig, {"run_dir": str(tmp_path / "run"), **kw})
        return exc.value.problems

    assert problems() == ["input: required; give the model to compress (--input DIR, or --inputs NAME=DIR,... for models "
                          "at their own depth)"]
    assert problems(inputs="h25=runs/a,h25=runs/b") == ["inputs: two inputs are named h25; give each its own NAME=PATH"]
    assert problems(inputs="h 25=runs/a") == ["inputs: 'h 25=runs/a': 'h 25' is not a usable name; give NAME=PATH, "
                                              "NAME of letters, digits, - and _"]
    assert problems(inputs="h25=") == ["inputs: 'h25=' names no model; give NAME=PATH (e.g. h25=runs/x/export25)"]
    assert problems(input="runs/a", inputs="a=runs/b,b=runs/a/") == [
        "inputs: runs/a is given twice (input, inputs); list each model once"]
    assert problems(inputs="h25=runs/a", layers="3", importance="runs/imp", base_model="runs/base") == [
        f"{key}: applies to input (the model layers are removed from); inputs are swept at their own depth: give "
        f"--input too, or drop {flag}" for key, flag in (("layers", "--layers"), ("importance", "--importance"),
                                                         ("base_model", "--base-model"))]
    rc = cli.main(["sweep", "--run-dir", str(tmp_path / "run"), "--inputs", "h25=runs/a", "--layers", "3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("stcompress sweep: error: layers: applies to input")
    assert not (tmp_path / "run").exists()
    # the input's own (input or inputs) is what --print-config asks for
    assert cli.main(["sweep", "--print-config"]) == 0
    assert "\ninput: null  # required" in capsys.readouterr().out
    assert cli.main(["sweep", "--print-config", "--inputs", "h25=runs/a"]) == 0
    assert "# required" not in capsys.readouterr().out.replace("run_dir: null  # required", "")


def test_parse_input():
    assert sweep.parse_input("h25=runs/x/export25") == ("h25", "runs/x/export25")
    assert sweep.parse_input(" runs/x/export25/ ") == ("export25", "runs/x/export25/")
    assert sweep.parse_input("runs/a=b/export25") == ("export25", "runs/a=b/export25")  # "=" inside the path


def test_inputs_join_the_grid_at_their_own_depth(tmp_path, tiny_model_dir):
    """input's grid (layers from the importance order) plus a 3-layer model at its own depth: every
    candidate once, named by its input, exporting from its own model; sweep.json's identities cover both."""
    from stcompress.model.tiny import tiny_model_cache
    from stcompress.stages import run as runner

    small = tiny_model_cache(text_layers=3)
    cfg = _sweep_cfg(tmp_path, tiny_model_dir, inputs=(f"h3={small}",))
    points = sweep.candidates(cfg)
    assert [(p.name, p.kept_layers, p.path) for p in points] == [
        ("L4-bf16", 4, str(tiny_model_dir)), ("L4-nf4", 4, str(tiny_model_dir)), ("L3-bf16", 3, str(tiny_model_dir)),
        ("L3-nf4", 3, str(tiny_model_dir)), ("h3-L3-bf16", 3, str(small)), ("h3-L3-nf4", 3, str(small))]
    data = sweep.recipe(cfg, points)
    exports = {st["name"]: st["config"] for st in data["stages"] if st["stage"] == "export"}
    assert exports["h3-L3-nf4"]["input"] == str(small) and exports["h3-L3-nf4"]["quantize"] == "nf4"
    assert "importance" not in exports["h3-L3-bf16"] and "num_layers" not in exports["h3-L3-bf16"]
    assert exports["L3-bf16"]["num_layers"] == 1 and exports["L3-bf16"]["input"] == str(tiny_model_dir)
    assert str(tiny_model_dir) in data["description"] and str(small) in data["description"]
    evaluations = {st["name"]: st["config"]["model"]["path"] for st in data["stages"] if st["stage"] == "evaluate"}
    assert evaluations["h3-L3-nf4-dev"] == "${h3-L3-nf4}" and evaluations["h3-L3-nf4-test"] == "${h3-L3-nf4}"
    runner.parse_recipe(tmp_path / "sweep.yaml", data)  # every stage validates; names unique
    found = sweep.identities(cfg)
    assert found["inputs.h3"]["sha256"] != found["input"]["sha256"]
    # inputs alone (no input): a bare path is named by its directory
    only = sweep.candidates(_sweep_cfg(tmp_path, tiny_model_dir, input="", importance=None, layers=(),
                                       precisions=("int8",), inputs=(str(tiny_model_dir), f"h3={small}")))
    assert [p.name for p in only] == [f"{tiny_model_dir.name}-L4-int8", "h3-L3-int8"]


def test_an_input_added_or_left_out_keeps_the_sweep_resumable(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    found = {"input": {"sha256": "a"}, "inputs.h25": {"sha256": "b"}}
    (run_dir / "sweep.json").write_text(json.dumps({"inputs": found, "redo": False}))
    assert sweep._check_content(run_dir, found | {"inputs.h50": {"sha256": "c"}}, restart=False) is False
    assert sweep._check_content(run_dir, {"input": {"sha256": "a"}}, restart=False) is False
    with pytest.raises(StcompressError, match="inputs.h25: its content differs"):
        sweep._check_content(run_dir, found | {"inputs.h25": {"sha256": "x"}}, restart=False)


def test_sweep_table_lists_each_candidates_input_and_one_frontier_over_all(tmp_path):
    """A candidate of one input beats one of another: the frontier is drawn over every candidate."""
    run_dir = tmp_path / "run"
    cands = [("L4-bf16", None, 1000, 60.0), ("h25-L3-bf16", "h25", 500, 55.0), ("h50-L2-nf4", "h50", 800, 50.0)]
    record = []
    for name, source, size, _ in cands:
        (run_dir / name).mkdir(parents=True)
        (run_dir / name / "manifest.json").write_text(json.dumps({"measured_bytes": {"safetensors": size, "torch_save": size}}))
        record.append({"name": name, "input": source, "input_path": "runs/x/teacher-merged" if source is None else f"runs/{source}",
                       "kept_layers": 3, "precision": "bf16", "trim": False, "dev": f"{name}-dev", "test": f"{name}-test"})
    (run_dir / "sweep.json").write_text(json.dumps({"candidates": record}))
    rows = [_row(f"{name}-dev", "dev") for name, *_ in cands]
    for r, (*_, score) in zip(rows, cands):
        r.scores = {"chrf": {"score": score}, "chrf++": {"score": score}}
    head, body = report.sweep_table(run_dir, rows)
    assert head[:3] == ["candidate", "input", "LM layers"] and head[-1] == "dev frontier (chrF++)"
    assert [(cells[0], cells[1], cells[-1]) for cells in body] == [
        ("L4-bf16", "input (teacher-merged)", "★"), ("h25-L3-bf16", "h25", "★"), ("h50-L2-nf4", "h50", "")]
    for c in record:  # a sweep of one input (and sweep.json written before inputs existed): no input column
        c.pop("input"), c.pop("input_path")
    (run_dir / "sweep.json").write_text(json.dumps({"candidates": record}))
    assert report.sweep_table(run_dir, rows)[0][1] == "LM layers"


@pytest.mark.slow  # about a minute on a loaded 2-core machine: 2 exports, 4 evaluations, a prune, a rerun
def test_sweep_of_two_inputs_end_to_end(tmp_path, tiny_model_dir, capsys):
    """The tiny model and a pruned copy of it, one precision: candidates from both, one table with
    their inputs and one frontier over both; a rerun skips all; changed content of one is refused."""
    from stcompress.config import ModelConfig, PruneConfig
    from stcompress.stages import prune

    data = DataConfig(dataset="builtin:demo-dev", target_lang="de", limit=1)
    pruned = prune.run(PruneConfig(output=str(tmp_path / "pruned"), layers=(1,), check_segments=1, check_max_new_tokens=4,
                                   model=ModelConfig(path=str(tiny_model_dir), device="cpu", dtype="float32"), data=data),
                       progress=False)
    cfg = _sweep_cfg(tmp_path, tiny_model_dir, input="", importance=None, layers=(), precisions=("bf16",),
                     inputs=(f"teacher={tiny_model_dir}", f"p1={pruned}"), dev=data,
                     test=DataConfig(dataset="builtin:demo-test", target_lang="de", limit=1))
    run_dir = sweep.run(cfg, progress=False)
    record = json.loads((run_dir / "sweep.json").read_text())
    names = ["teacher-L4-bf16", "p1-L3-bf16"]
    assert [(c["name"], c["input"]) for c in record["candidates"]] == [("teacher-L4-bf16", "teacher"), ("p1-L3-bf16", "p1")]
    assert set(record["inputs"]) >= {"inputs.teacher", "inputs.p1"}
    assert [read_manifest(run_dir / n)["model"]["decoder_layers"] for n in names] == [4, 3]
    md = (run_dir / "report" / "report.md").read_text()
    table = md.split("## Pareto sweep: every candidate")[1].split("\n\n")[1].splitlines()
    head = [h.strip() for h in table[0].strip("|").split("|")]
    assert head[:3] == ["candidate", "input", "LM layers"]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table[2:]]
    assert [(c[0], c[1], c[2]) for c in cells] == [("teacher-L4-bf16", "teacher", "4"), ("p1-L3-bf16", "p1", "3")]
    sizes = [read_manifest(run_dir / n)["measured_bytes"]["safetensors"] for n in names]
    for split in ("dev", "test"):
        col = next(i for i, h in enumerate(head) if h.startswith(f"{split} frontier"))
        metric = "chrf++" if "chrF++" in head[col] else "chrf"
        scores = [json.loads((run_dir / f"{n}-{split}" / "scores.json").read_text())["scores"][metric]["score"] for n in names]
        assert [c[col] == "★" for c in cells] == report.frontier(list(zip(sizes, scores)))  # one frontier over both
    capsys.readouterr()
    sweep.run(cfg, progress=False)
    assert capsys.readouterr().out.count("[skip: unchanged]") == 7  # 2 exports, 4 evaluations, the report
    (pruned / "config.json").write_text((pruned / "config.json").read_text() + "\n")
    with pytest.raises(StcompressError, match="inputs.p1: its content differs from what this sweep used"):
        sweep.run(cfg, progress=False)
