"""Config loading: defaults < YAML < command line; every problem reported at once."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from stcompress.config import DataConfig, EvaluateConfig, TranslateConfig, flat_fields, load_config, read_yaml, to_dict
from stcompress.errors import ConfigError

MODEL = {"model": {"path": "builtin:tiny-random"}}


def test_precedence_yaml_then_overrides(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("output: runs/a\nmodel:\n  path: builtin:tiny-random\ngeneration:\n  batch_size: 4\n  max_new_tokens: 64\ndata:\n  target_lang: zh\n")
    cfg = load_config(TranslateConfig, read_yaml(path), {"generation.batch-size": "2", "model.load_in_4bit": "true"})
    assert cfg.output == "runs/a"
    assert cfg.generation.batch_size == 2  # command line wins
    assert cfg.generation.max_new_tokens == 64  # from YAML
    assert cfg.data.target_lang == "zh"
    assert cfg.model.load_in_4bit is True
    assert cfg.prompt.system == "You are a professional translator."  # default


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as err:
        load_config(
            TranslateConfig,
            {"generation": {"batch_size": "many", "beams": 2}, "data": {"subset": "validation", "target_lang": "xx"},
             "model": {"path": "builtin:tiny-random"}},
            {"on_error": "ignore"},
        )
    problems = err.value.problems
    text = str(err.value)
    assert len(problems) == 5, problems
    assert "generation.batch_size: expected an integer (got 'many')" in text
    assert "generation.beams: unknown key" in text and "num_beams" in text
    assert "data.subset: expected one of all, train, dev, test" in text
    assert "data.target_lang: unknown language code 'xx'" in text
    assert "on_error: expected one of fail, skip" in text


def test_semantic_checks():
    with pytest.raises(ConfigError, match="generation.max_new_tokens: must be at least 1"):
        load_config(TranslateConfig, {"generation": {"max_new_tokens": 0}, **MODEL})
    with pytest.raises(ConfigError, match=r"prompt.instruction: must contain \{language\}"):
        load_config(TranslateConfig, {"prompt": {"instruction": "Translate this"}, **MODEL})


def test_optional_and_tuple_fields():
    cfg = load_config(EvaluateConfig, None, {"metrics": "bleu,chrf", "hypotheses": "x.jsonl", "data.limit": "null"})
    assert cfg.metrics == ("bleu", "chrf") and cfg.hypotheses == "x.jsonl" and cfg.data.limit is None
    assert to_dict(cfg)["metrics"] == ["bleu", "chrf"]


def test_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        read_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("generation: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_yaml(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        read_yaml(scalar)
    with pytest.raises(ConfigError, match="generation: expected a mapping"):
        load_config(TranslateConfig, {"generation": 3})


def test_flat_fields_cover_nested_sections():
    names = {name for name, _, _ in flat_fields(TranslateConfig)}
    assert {"output", "model.path", "data.target_lang", "generation.max_new_tokens", "prompt.system"} <= names


@dataclass(frozen=True)
class Mix:
    datasets: tuple[DataConfig, ...] = ()
    name: str = "x"


def test_list_of_sections():
    cfg = load_config(Mix, {"datasets": [{"dataset": "a.jsonl"}, {"dataset": "b.jsonl", "target_lang": "zh"}]})
    assert [d.dataset for d in cfg.datasets] == ["a.jsonl", "b.jsonl"] and cfg.datasets[1].target_lang == "zh"
    with pytest.raises(ConfigError, match=r"datasets\[1\].subset: expected one of"):
        load_config(Mix, {"datasets": [{"dataset": "a"}, {"subset": "bad"}]})
    with pytest.raises(ConfigError, match="datasets: expected a list of DataConfig mappings"):
        load_config(Mix, {"datasets": {"dataset": "a"}})
    assert "datasets" not in {n for n, _, _ in flat_fields(Mix)}


def test_section_defaults_of_the_parent_survive_partial_overrides():
    from stcompress.config import PruneConfig

    cfg = load_config(PruneConfig, {"model": {"path": "some/dir/model"}, "layers": [1]}, {"model.device": "cpu"})
    assert cfg.model.dtype == "checkpoint" and cfg.model.path == "some/dir/model" and cfg.model.device == "cpu"
