"""Every shipped recipe validates, and the paper recipes carry the paper's settings (shared/PAPER.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from stcompress.stages.run import parse_recipe

from stcompress.stages.demo import RECIPE as DEMO_RECIPE

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
ALL = [*sorted(RECIPES.glob("*.yaml")), DEMO_RECIPE]


def test_recipes_are_shipped():
    names = {p.stem for p in ALL}
    assert {"recipe", "de-model-a", "de-model-b", "zh-model-a", "zh-model-b", "de-model-b-12layers",
            "de-model-b-16layers", "de-model-b-lora", "de-model-a-word-kd"} <= names


@pytest.mark.parametrize("path", ALL, ids=[p.stem for p in ALL])
def test_recipe_validates(path):
    recipe = parse_recipe(path)
    assert recipe.steps and recipe.steps[-1].stage == "report"
    assert len({s.output for s in recipe.steps}) == len(recipe.steps)


def _steps(name: str) -> dict:
    return {s.name: s.config for s in parse_recipe(RECIPES / f"{name}.yaml").steps}


@pytest.mark.parametrize("lang", ["de", "zh"])
def test_model_b_settings(lang):
    s = _steps(f"{lang}-model-b")
    t = s["teacher"].train
    assert s["teacher"].mode == "full" and s["teacher"].model.path == "Qwen/Qwen2-Audio-7B-Instruct"
    assert (t.epochs, t.batch_size, t.lr, t.scheduler, t.warmup_steps, t.weight_decay) == (3, 4, 1e-5, "cosine", 0, 0.001)
    assert s["teacher"].data.dataset == "ymoslem/ACL-6060" and s["teacher"].data.split == "dev+eval"
    assert s["teacher"].data.test_size == 100 and s["teacher"].data.split_seed == 0
    assert s["importance"].rounds == 8 and s["importance"].metric == ("chrf++" if lang == "de" else "chrf")
    assert s["prune"].num_layers == 8 and s["prune"].importance.endswith("/importance")
    assert s["student"].mode == "full" and s["student"].train.epochs == 4 and s["student"].model.path.endswith("/prune")
    heal = s["heal"]
    assert heal.mode == "qlora" and (heal.train.epochs, heal.train.batch_size, heal.train.lr) == (1, 8, 1e-5)
    assert (heal.lora.r, heal.lora.alpha, heal.lora.rslora, heal.lora.dropout, heal.lora.audio_tower) == (64, 128, True, 0, True)
    assert [m.repeat for m in heal.datasets] == [1, 10, 1] and heal.datasets[2].data.limit == 100_000
    assert "PATH/TO/covost2" in heal.datasets[2].data.dataset  # the placeholder users fill in
    assert all(c.data.target_lang == lang for c in s.values() if hasattr(c, "data"))
    assert s["eval"].comet.model == "Unbabel/wmt20-comet-da" and s["eval"].data.subset == "test"
    assert s["export-nf4"].quantize == "nf4"


@pytest.mark.parametrize("lang", ["de", "zh"])
def test_model_a_settings(lang):
    s = _steps(f"{lang}-model-a")
    heal = s["heal"]
    assert heal.mode == "qlora" and heal.model.path.endswith("/teacher")
    assert (heal.train.epochs, heal.train.batch_size, heal.train.lr) == (4, 4, 1e-5)
    assert heal.datasets[0].distilled.endswith("/distill") and "prune" not in s


def test_variants():
    assert _steps("de-model-b-12layers")["prune"].num_layers == 12
    assert _steps("de-model-b-16layers")["importance"].rounds == 16
    assert _steps("de-model-b-lora")["heal"].mode == "lora"
    kd = _steps("de-model-a-word-kd")["heal"].kd
    assert kd.ratio == 0.5 and kd.teacher.endswith("/teacher")


def test_demo_recipe_runs_the_model_b_chain_on_the_builtin_task():
    s = {st.name: st for st in parse_recipe(DEMO_RECIPE).steps}
    assert [st.stage for st in s.values()] == ["finetune", "evaluate", "importance", "prune", "evaluate", "distill",
                                              "finetune", "finetune", "export", "evaluate", "report"]
    teacher = s["teacher"].config
    assert teacher.model.path == "builtin:demo-base" and teacher.train.freeze_audio_tower and teacher.train.cache_audio
    assert s["heal"].config.mode == "qlora" and "audio_tower" in s["heal"].config.lora.keep_unquantized
    assert all(c.config.model.device == "cpu" for c in s.values() if hasattr(c.config, "model"))
    tests = {c.config.data.dataset for n, c in s.items() if c.stage == "evaluate"}
    assert tests == {"builtin:demo-test"} and s["importance"].config.data.dataset == "builtin:demo-dev"


