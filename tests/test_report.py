"""`stcompress report`: tables, plots and the heatmap rendered from what stages wrote."""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import pytest

from stcompress import cli
from stcompress.artifacts import read_manifest
from stcompress.config import EvaluateConfig, ModelConfig, DataConfig, GenerationConfig, ReportConfig
from stcompress.stages import evaluate, report


@pytest.fixture(scope="module")
def real_eval(tmp_path_factory, tiny_model_dir) -> Path:
    """One real evaluate output (tiny model, 2 segments): the exact format the report reads."""
    out = tmp_path_factory.mktemp("eval") / "teacher-eval"
    cfg = EvaluateConfig(output=str(out), model=ModelConfig(path=str(tiny_model_dir), device="cpu"),
                         data=DataConfig(limit=2), generation=GenerationConfig(max_new_tokens=2, batch_size=2))
    return evaluate.run(cfg, progress=False)


def _variant(src: Path, dst: Path, *, layers: int, size: int, scores: dict[str, float], lang: str | None = None) -> None:
    shutil.copytree(src, dst)
    data = json.loads((dst / "scores.json").read_text())
    data = copy.deepcopy(data)
    data["model"].update(decoder_layers=layers, bytes_on_disk=size)
    for name, value in scores.items():
        data["scores"][name] = {"name": name, "score": value, "signature": f"{name}-signature"}
    if lang:
        data["target_lang"] = lang
    (dst / "scores.json").write_text(json.dumps(data))


def _run_dir(tmp_path: Path, real_eval: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    _variant(real_eval, run / "teacher-eval", layers=32, size=16_800_000_000,
             scores={"chrf++": 60.0, "bleu": 40.0, "comet": 80.0})
    _variant(real_eval, run / "pruned-eval", layers=24, size=12_900_000_000,
             scores={"chrf++": 54.0, "bleu": 35.0, "comet": 72.0})
    _variant(real_eval, run / "eval-nf4", layers=24, size=1_500_000_000,
             scores={"chrf++": 59.4, "bleu": 42.0, "comet": 79.0})
    _variant(real_eval, run / "zh-eval", layers=32, size=300_000_000, scores={"chrf": 30.0}, lang="zh")
    imp = run / "importance"
    imp.mkdir()
    (imp / "manifest.json").write_text(json.dumps({"stage": "importance"}))
    (imp / "removal_order.json").write_text(json.dumps({"removal_order": [13, 3], "metric": "chrf++"}))
    rows = report.read_rows([run / "teacher-eval"])
    report.relate(rows, None)
    (imp / "heatmap.png").write_bytes(report.plot_layers(rows, "chrf++"))  # any PNG stands in for the heatmap
    order = ["teacher-eval", "importance", "pruned-eval", "eval-nf4", "zh-eval"]
    stages = {n: {"stage": "evaluate", "status": "done", "seconds": 1.25} for n in order}
    (run / "plan.json").write_text(json.dumps({"order": order, "stages": stages}))
    return run


def test_report_from_stage_outputs(tmp_path, real_eval):
    run = _run_dir(tmp_path, real_eval)
    out = report.run(ReportConfig(run_dir=str(run)), progress=False)
    assert out == run / "report"
    md = (out / "report.md").read_text()
    de_table = md.split("## English -> German")[1].split("## ")[0]
    assert "| model / stage | LM layers | removed | parameters | bytes on disk | BLEU | chrF | chrF++ | COMET |" in de_table
    lines = [line for line in de_table.splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[0] for line in lines[1:]] == ["| teacher-eval (teacher)", "| pruned-eval", "| eval-nf4"]
    nf4 = lines[3].split(" | ")
    assert nf4[1:3] == ["24", "8"] and nf4[4] == "1.50 GB" and nf4[5] == "42.00"  # rendered, not recomputed
    assert "99.0" in nf4 and "98.8" in nf4  # % of the teacher's chrF++ and COMET
    assert "## English -> Chinese (zh)" in md and "% of teacher (chrF)" in md
    assert "`chrf++: chrf++-signature`" in md
    assert "| eval-nf4 | evaluate | done | 1.2 |" in md  # the run's own record of each stage
    for name in ("quality_vs_layers_de.png", "quality_vs_size_de.png", "heatmap_importance.png", "quality_vs_size_zh.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG" and f"]({name})" in md
    page = (out / "report.html").read_text()
    assert page.count("src='data:image/png;base64,") == 5
    assert not re.search(r"src=['\"](?!data:)", page)  # self-contained
    assert "removal order [13, 3]" in page
    manifest = read_manifest(out)
    assert manifest["stage"] == "report" and manifest["teachers"] == {"de": "teacher-eval", "zh": "zh-eval"}
    assert "report" not in manifest["inputs"]


def test_pareto_front():
    points = [(16.8, 80.0), (12.9, 72.0), (1.5, 79.0), (0.3, 60.0), (1.5, 70.0)]
    assert report.pareto(points) == [0, 2, 3]


def test_teacher_choice_and_cli(tmp_path, real_eval, capsys):
    run = _run_dir(tmp_path, real_eval)
    assert cli.main(["report", str(run), "--teacher", "pruned-eval", "--output", str(tmp_path / "rep"), "-q"]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| pruned-eval (teacher) |" in md
    assert cli.main(["report", str(run), "--teacher", "nope", "-q"]) == 2
    assert "no evaluate output named 'nope'" in capsys.readouterr().err


def test_report_without_scores_fails_and_writes_nothing(tmp_path, capsys):
    (tmp_path / "run" / "tr").mkdir(parents=True)
    (tmp_path / "run" / "tr" / "manifest.json").write_text('{"stage": "translate"}')
    assert cli.main(["report", str(tmp_path / "run"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "holds no evaluate output (scores.json) to report (found: tr); run an evaluate stage first" in err
    assert "Traceback" not in err and not (tmp_path / "run" / "report").exists()
