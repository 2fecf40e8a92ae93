"""`stcompress run`: recipe validation, the plan, skip-on-unchanged, resume, --from / --only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from stcompress import cli
from stcompress.config import RunConfig
from stcompress.errors import ConfigError, StcompressError
from stcompress.stages import run as runner


def _recipe(tmp_path: Path, tiny_model_dir: Path, **ev_config) -> Path:
    recipe = {
        "run_dir": str(tmp_path / "run"),
        "defaults": {"model": {"path": str(tiny_model_dir), "device": "cpu"},
                     "data": {"limit": 2}, "generation": {"max_new_tokens": 2, "batch_size": 2}},
        "stages": [
            {"name": "tr", "stage": "translate", "config": {}},
            {"name": "ev", "stage": "evaluate", "config": {"hypotheses": "${tr}", "metrics": ["chrf"], **ev_config}},
        ],
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _count_calls(monkeypatch) -> dict[str, int]:
    calls: dict[str, int] = {}
    for stage in ("translate", "evaluate"):
        module = __import__(f"stcompress.stages.{stage}", fromlist=["run"])
        real = module.run

        def counted(cfg, *, progress=True, _real=real, _stage=stage):
            calls[_stage] = calls.get(_stage, 0) + 1
            return _real(cfg, progress=progress)

        monkeypatch.setattr(module, "run", counted)
    return calls


def test_validation_reports_every_problem_with_stage_names(tmp_path):
    recipe = {
        "run_dir": str(tmp_path / "run"),
        "defaults": {"model": {"path": "builtin:tiny-random"}},
        "stages": [
            {"name": "tr", "stage": "translate", "config": {"generation": {"max_new_tokens": 0}}},
            {"name": "tr", "stage": "translate"},
            {"name": "ev", "stage": "evaluate", "config": {"hypotheses": "${nope}", "metrix": ["chrf"]}},
            {"name": "x", "stage": "compress"},
            {"name": "ex", "stage": "export", "config": {"output": "elsewhere", "input": "${tr.model}"}},
        ],
    }
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ConfigError) as err:
        runner.parse_recipe(path)
    text = "\n".join(err.value.problems)
    assert "tr (translate): generation.max_new_tokens: must be at least 1" in text
    assert "'tr' is used twice" in text
    assert "${nope} names no earlier stage; earlier stages (and run_dir): run_dir, tr" in text
    assert "ev (evaluate): metrix: unknown key" in text
    assert "unknown stage 'compress'" in text
    assert "config.output: set by the runner" in text
    assert len(err.value.problems) == 6


def test_references_defaults_and_outputs(tmp_path, tiny_model_dir):
    path = _recipe(tmp_path, tiny_model_dir)
    recipe = runner.parse_recipe(path)
    tr, ev = recipe.steps
    assert tr.config.output == str(tmp_path / "run" / "tr") and tr.config.data.limit == 2
    assert ev.config.hypotheses == str(tmp_path / "run" / "tr") and ev.reads == ["tr"]
    assert ev.config.model.path == str(tiny_model_dir)  # defaults reach every stage that has the section


def test_the_recipe_language_reaches_finetune_mix_entries(tmp_path):
    recipe = {
        "run_dir": str(tmp_path / "run"),
        "defaults": {"data": {"target_lang": "zh", "limit": 3}, "model": {"path": "builtin:tiny-random"}},
        "stages": [{"name": "ft", "stage": "finetune", "config": {"datasets": [
            {"data": {"dataset": "builtin"}},
            {"data": {"dataset": "builtin", "target_lang": "de"}},
        ]}}],
    }
    (ft,) = runner.parse_recipe(tmp_path / "r.yaml", recipe).steps
    first, second = (mix.data for mix in ft.config.datasets)
    assert (first.target_lang, second.target_lang) == ("zh", "de")  # an entry's own language wins
    assert first.limit is None and ft.config.data.limit == 3  # other data defaults stay out of the mix


def test_dry_run_prints_plan_and_writes_nothing(tmp_path, tiny_model_dir, capsys):
    path = _recipe(tmp_path, tiny_model_dir)
    assert cli.main(["run", str(path), "--dry-run", "-q"]) == 0
    out = capsys.readouterr().out
    assert "tr" in out and "reads: tr" in out and "run: no complete output" in out
    assert not (tmp_path / "run").exists()
    assert cli.main(["run", "--dry-run", str(path), "-q"]) == 0  # the flag before the recipe works too
    assert "reads: tr" in capsys.readouterr().out


def test_unknown_from_names_the_stages(tmp_path, tiny_model_dir):
    path = _recipe(tmp_path, tiny_model_dir)
    with pytest.raises(StcompressError, match="stages: tr, ev"):
        runner.run(RunConfig(recipe=str(path), from_stage="nope", dry_run=True))


def test_skip_resume_from_only(tmp_path, tiny_model_dir, monkeypatch):
    calls = _count_calls(monkeypatch)
    path = _recipe(tmp_path, tiny_model_dir)
    run_dir = tmp_path / "run"

    # an interrupted run: translate finishes, evaluate fails
    import stcompress.stages.evaluate as evaluate

    counted = evaluate.run
    monkeypatch.setattr(evaluate, "run", lambda cfg, progress=True: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        runner.run(RunConfig(recipe=str(path)), progress=False)
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["stages"]["tr"]["status"] == "done" and plan["stages"]["ev"]["status"] == "interrupted"
    monkeypatch.setattr(evaluate, "run", counted)

    runner.run(RunConfig(recipe=str(path)), progress=False)  # resumes at ev
    assert calls == {"translate": 1, "evaluate": 1}
    assert (run_dir / "ev" / "scores.json").is_file() and (run_dir / "manifest.json").is_file()

    runner.run(RunConfig(recipe=str(path)), progress=False)  # unchanged: nothing runs
    assert calls == {"translate": 1, "evaluate": 1}

    path = _recipe(tmp_path, tiny_model_dir, metrics=["chrf", "bleu"])  # ev's config changed
    decisions = runner.decide(runner.parse_recipe(path), RunConfig(recipe=str(path)))
    assert decisions == {"tr": "skip: unchanged", "ev": "run: config changed"}
    runner.run(RunConfig(recipe=str(path)), progress=False)
    assert calls == {"translate": 1, "evaluate": 2}

    runner.run(RunConfig(recipe=str(path), only="ev"), progress=False)
    assert calls == {"translate": 1, "evaluate": 3}
    runner.run(RunConfig(recipe=str(path), from_stage="tr"), progress=False)
    assert calls == {"translate": 2, "evaluate": 4}

    # an upstream output that changed behind the runner's back reruns its readers
    (run_dir / "tr" / "manifest.json").write_text((run_dir / "tr" / "manifest.json").read_text() + " ")
    decisions = runner.decide(runner.parse_recipe(path), RunConfig(recipe=str(path)))
    assert decisions["tr"].startswith("run") and decisions["ev"] == "run: upstream tr reruns"
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["order"] == ["tr", "ev"] and plan["stages"]["ev"]["seconds"] >= 0


def test_only_needs_complete_upstream(tmp_path, tiny_model_dir):
    path = _recipe(tmp_path, tiny_model_dir)
    with pytest.raises(StcompressError, match="reads tr, which has no complete output"):
        runner.run(RunConfig(recipe=str(path), only="ev"), progress=False)
