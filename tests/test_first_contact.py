"""First contact (issue 13): bad input fails before any work with one line naming the option, and the
CLI explains itself. No model is loaded here: every check runs before one would be."""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import pytest
import yaml

from stcompress import cli
from stcompress.config import DistillConfig, EvaluateConfig, PruneConfig, TranslateConfig, load_config
from stcompress.errors import ConfigError

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
MODEL = ["--model.path", "builtin:tiny-random"]


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


# -- item 4: a dry run checks every input ------------------------------------------------------

def test_dry_run_of_the_model_b_recipe_names_the_placeholder(tmp_path, capsys):
    assert cli.main(["run", str(RECIPES / "de-model-b.yaml"), "--dry-run", "-q"]) == 2
    err = _error(capsys)
    assert "heal (finetune): datasets[2].data.dataset: PATH/TO/covost2-en-de.jsonl does not exist" in err


def test_dry_run_reports_every_missing_input_at_once(tmp_path, capsys):
    recipe = {
        "run_dir": str(tmp_path / "run"),
        "defaults": {"model": {"path": "builtin:tiny-random"}},
        "stages": [
            {"name": "tr", "stage": "translate", "config": {"data": {"dataset": str(tmp_path / "nope.jsonl")}}},
            {"name": "ev", "stage": "evaluate", "config": {"model": {"path": str(tmp_path / "no-model")}}},
            {"name": "ev2", "stage": "evaluate", "config": {"hypotheses": "${tr}"}},  # made by the run: fine
            {"name": "ex", "stage": "export", "config": {"input": "Qwen/Qwen2-Audio-7B-Instruct"}},  # a hub id: fine
        ],
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert cli.main(["run", str(path), "--dry-run", "-q"]) == 2
    err = _error(capsys)
    assert "2 config problems" in err
    assert "tr (translate): data.dataset:" in err and "nope.jsonl does not exist" in err
    assert "ev (evaluate): model.path:" in err and "no-model does not exist" in err
    assert not (tmp_path / "run").exists()


# -- item 5: one coercion rule for YAML and the command line -------------------------------------

@pytest.mark.parametrize("value", [2.5, "2.5"])
def test_fractions_for_integer_fields_are_refused_from_yaml_and_cli(value):
    with pytest.raises(ConfigError, match=r"generation.batch_size: expected a whole number, not a fraction"):
        load_config(TranslateConfig, {"generation": {"batch_size": value}, "model": {"path": "builtin:tiny-random"}})
    with pytest.raises(ConfigError, match=r"data.limit: expected a whole number"):
        load_config(TranslateConfig, {"model": {"path": "x/y"}}, {"data.limit": value})


def test_whole_numbers_are_accepted_alike():
    for value in (2, "2", 2.0, "2.0"):
        cfg = load_config(TranslateConfig, {"generation": {"batch_size": value}, "model": {"path": "x/y"}})
        assert cfg.generation.batch_size == 2 and isinstance(cfg.generation.batch_size, int)


# -- item 6: local-looking paths fail at once, naming the option ----------------------------------

def test_existing_file_of_unknown_format_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Path("manifest.txt").write_text("id\taudio\n")
    assert cli.main(["translate", *MODEL, "--data.dataset", "manifest.txt", "-q"]) == 2
    err = _error(capsys)
    assert "data.dataset: manifest.txt is a file of unknown format (.txt)" in err and ".jsonl" in err and ".tsv" in err


def test_export_of_a_missing_input_names_input_not_model_path(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    import time

    t0 = time.perf_counter()
    assert cli.main(["export", "--input", "nowhere", "-q"]) == 2
    err = _error(capsys)
    assert err.count("\n") == 1 and "input: nowhere does not exist" in err and "model.path" not in err
    assert time.perf_counter() - t0 < 5  # no hub retries


def test_hub_ids_and_local_paths_are_told_apart(tmp_path, monkeypatch):
    from stcompress.preflight import is_hub_id

    monkeypatch.chdir(tmp_path)
    assert is_hub_id("Qwen/Qwen2-Audio-7B-Instruct") and is_hub_id("ymoslem/ACL-6060")
    assert not any(is_hub_id(v) for v in ("nowhere", "./a/b", "/a/b", "a/b/c", "~/x", "PATH/TO/x.jsonl", "org/m.txt"))
    Path("org").mkdir()
    Path("org/name").mkdir()
    assert not is_hub_id("org/name")  # it exists here: local


# -- item 7: prune's option combinations ----------------------------------------------------------

def test_prune_refuses_layers_with_num_layers():
    with pytest.raises(ConfigError, match=r"num_layers: only applies to an importance removal order; --layers already"):
        load_config(PruneConfig, {"layers": [1], "num_layers": 99, "model": {"path": "x/y"}})


def test_prune_num_layers_says_what_it_needs(capsys):
    assert cli.main(["prune", "--num-layers", "2", "-q", *MODEL]) == 2
    assert "num_layers: only applies to an importance removal order; give --importance DIR" in _error(capsys)


# -- item 9: the model is required ---------------------------------------------------------------

@pytest.mark.parametrize("command", ["translate", "evaluate", "importance", "distill", "finetune", "prune"])
def test_leaving_out_the_model_is_an_error(command, capsys):
    extra = ["--layers", "1"] if command == "prune" else []
    assert cli.main([command, "-q", *extra]) == 2
    err = _error(capsys)
    assert "model.path: required; give --model.path DIR|HUB_ID" in err and "builtin:tiny-random" in err


def test_the_model_is_not_required_where_a_manifest_names_it():
    assert load_config(EvaluateConfig, {"hypotheses": "h.jsonl"}).hypotheses == "h.jsonl"
    assert load_config(PruneConfig, {"importance": "imp"}).model.path == ""


def test_builtin_model_lists_agree():
    from stcompress.config import BUILTIN_MODELS
    from stcompress.model.tiny import _BUILTIN_BUILDERS

    assert set(BUILTIN_MODELS) == {f"builtin:{n}" for n in _BUILTIN_BUILDERS}


# -- item 12: --help explains every option, with the real defaults ---------------------------------

def _help(command: str, capsys) -> str:
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    return " ".join(capsys.readouterr().out.split())


def test_help_shows_meaning_and_real_defaults(capsys):
    prune = _help("prune", capsys)
    dtype = prune.split("options:")[1].split("--model.dtype {auto,checkpoint,bfloat16,float16,float32}")[1].split("--model.device")[0]
    assert dtype.strip() == "auto: bf16 on GPU, fp32 on CPU; checkpoint: the dtype the weights were saved in (default: checkpoint)"
    distill = _help("distill", capsys)
    subset = distill.split("options:")[1].split("--data.subset {all,train,dev,test}")[1].split("--data.test-size")[0]
    assert subset.strip().endswith("(default: train)") and "dev" in subset
    assert "builtin:demo-base" in distill  # the built-in models are listed


def test_every_option_has_a_meaning():
    from stcompress.config import field_help, flat_fields

    missing = [f"{name} {dotted}" for name, cmd in cli.COMMANDS.items()
               for dotted, _, _ in flat_fields(cmd.config_cls) if not field_help(cmd.config_cls, dotted)]
    assert not missing


def test_run_help_lists_from_once_as_one_option(capsys):
    text = _help("run", capsys)
    assert "--from-stage VALUE, --from_stage VALUE, --from VALUE" in text
    assert text.count("--from VALUE") == 1  # one option, not a second one with its own help
    parser = cli.build_parser()
    a = parser.parse_args(["run", "r.yaml", "--from", "x"])
    b = parser.parse_args(["run", "r.yaml", "--from-stage", "x"])
    assert vars(a)["cfg:from_stage"] == vars(b)["cfg:from_stage"] == "x"


# -- item 13: --print-config prints the skeleton ---------------------------------------------------

@pytest.mark.parametrize("command,field", [("export", "input"), ("report", "run_dir"), ("run", "recipe")])
def test_print_config_marks_required_fields(command, field, capsys):
    assert cli.main([command, "--print-config"]) == 0
    out = capsys.readouterr().out
    assert f"{field}: null  # required" in out
    yaml.safe_load(out)  # still valid YAML


def test_print_config_marks_a_missing_model(capsys):
    assert cli.main(["translate", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "model:\n  path: null  # required" in out


# -- item 14: no FutureWarnings under -q ------------------------------------------------------------

def test_quiet_hides_future_warnings(tmp_path, monkeypatch):
    seen = []

    def stage(cfg, *, progress=True):
        with warnings.catch_warnings(record=True) as caught:
            warnings.warn("`torch_dtype` is deprecated", FutureWarning)
        seen.extend(caught)
        return Path(cfg.output)

    from stcompress.stages import translate

    monkeypatch.setattr(translate, "run", stage)
    assert cli.main(["translate", *MODEL, "--output", str(tmp_path / "o"), "-q"]) == 0
    assert not seen


def test_messages_suggest_the_flag(tmp_path):
    from stcompress.config import DataConfig
    from stcompress.data.sources import load_examples
    from stcompress.errors import DataError

    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "a", "audio": "missing.wav", "text_de": "x"}) + "\n")
    with pytest.raises(DataError, match=r"\(or pass --on-error skip to leave such items out\)"):
        load_examples(DataConfig(dataset=str(manifest)))


# -- item 10: evaluate states segments scored / skipped; item 14: numbers formatted ----------------

def test_evaluate_states_scored_and_skipped_segments(tmp_path, capsys):
    tr = tmp_path / "tr"
    tr.mkdir()
    rows = [{"id": f"u{i}", "hypothesis": "Guten Morgen", "references": ["Guten Morgen"], "target_lang": "de"}
            for i in range(2)]
    (tr / "hypotheses.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tr / "manifest.json").write_text(json.dumps({
        "stage": "translate", "counts": {"translated": 2, "skipped": 4},
        "model": {"decoder_layers": 4, "parameters": 1000},
        "speed": {"segments_per_s": 1.0257387557399407, "tokens_per_s": 12.391351732157045, "seconds": 5.849137}}))
    out = tmp_path / "ev"
    assert cli.main(["evaluate", "--hypotheses", str(tr), "--metrics", "chrf", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "segments: 2 scored, 4 skipped (not in these scores)" in printed
    assert "speed: 1.03 segments/s, 12.4 tokens/s (5.8 s)" in printed
    scores = json.loads((out / "scores.json").read_text())
    assert (scores["segments_scored"], scores["segments_skipped"]) == (2, 4)
    assert json.loads((out / "manifest.json").read_text())["counts"] == {"scored": 2, "skipped": 4}


# -- item 8: prune finds the ranked model from any working directory --------------------------------

def _importance_output(root: Path, model: Path, *, resolved: bool) -> Path:
    (root / "models").mkdir(parents=True)
    (root / "models" / "m").symlink_to(model)
    imp = root / "runs" / "importance"
    imp.mkdir(parents=True)
    manifest = {"stage": "importance", "config": {"component": "decoder", "model": {"path": "models/m"}},
                "removal_order": [2, 1]}
    if resolved:  # what stcompress writes now: the resolved path and the content hash
        manifest["inputs"] = {"model": {"path": str((root / "models" / "m").resolve()), "sha256": "x"}}
    (imp / "manifest.json").write_text(json.dumps(manifest))
    return imp


def test_prune_reads_the_resolved_model_path_an_importance_manifest_records(tmp_path, tiny_model_dir, monkeypatch):
    from stcompress.stages.prune import recorded_model

    imp = _importance_output(tmp_path / "project", tiny_model_dir, resolved=True)
    monkeypatch.chdir(tmp_path)
    path, identity = recorded_model(str(imp))
    assert Path(path) == tiny_model_dir.resolve() and identity["sha256"] == "x"


def test_an_older_importance_output_resolves_against_its_own_location(tmp_path, tiny_model_dir, monkeypatch):
    from stcompress.stages.prune import _model_path

    imp = _importance_output(tmp_path / "project", tiny_model_dir, resolved=False)  # a relative path only
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    cfg, _ = _model_path(load_config(PruneConfig, {"importance": str(imp)}))
    assert Path(cfg.model.path).resolve() == tiny_model_dir.resolve()


@pytest.mark.slow
def test_prune_of_an_older_importance_output_from_another_directory(tmp_path, tiny_model_dir, monkeypatch):
    imp = _importance_output(tmp_path / "project", tiny_model_dir, resolved=False)  # relative path only
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    out = tmp_path / "pruned"
    assert cli.main(["prune", "--importance", str(imp), "--num-layers", "1", "--output", str(out), "--model.device", "cpu",
                     "--check-segments", "1", "--check-max-new-tokens", "2", "-q"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["removed_layers"] == [2] and Path(manifest["inputs"]["model"]["path"]) == tiny_model_dir.resolve()


# -- item 15: a progress line per stage under -q ----------------------------------------------------

class _Log(io.StringIO):
    def isatty(self) -> bool:
        return False


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_quiet_mode_shows_stage_step_total_and_eta(monkeypatch):
    from stcompress import progress

    log = _Log()
    monkeypatch.setattr(progress, "STATUS", progress.Status(enabled=True, interval=0.0, stream=log))
    with progress.stage("[1/11] teacher (finetune)"):
        bar = progress.bar(40, "finetune", "steps", progress=False)
        for _ in range(3):
            bar.update(1)
        bar.close()
    lines = log.getvalue().splitlines()
    assert lines[0] == "[1/11] teacher (finetune): starting"
    assert lines[2].startswith("[1/11] teacher (finetune): finetune 1/40 steps, ETA ")
    assert lines[-2].startswith("[1/11] teacher (finetune): finetune 3/40 steps, done in ")
    assert lines[-1].startswith("[1/11] teacher (finetune): finished in ")


def test_status_line_rewrites_itself_on_a_terminal_and_is_rate_limited_in_a_log(monkeypatch):
    from stcompress import progress

    tty = _Tty()
    monkeypatch.setattr(progress, "STATUS", progress.Status(enabled=True, stream=tty))
    bar = progress.bar(5, "translate", "seg", progress=False, leave=False)
    for _ in range(5):
        bar.update(1)
    bar.close()
    assert "\n" not in tty.getvalue() and tty.getvalue().count("\r") == 7
    log = _Log()
    monkeypatch.setattr(progress, "STATUS", progress.Status(enabled=True, interval=3600, stream=log))
    bar = progress.bar(500, "finetune", "steps", progress=False)
    for _ in range(500):
        bar.update(1)
    bar.close()
    assert len(log.getvalue().splitlines()) == 2  # the first line and the final one, not 500


def test_quiet_cli_turns_the_status_line_on(tmp_path, monkeypatch):
    from stcompress import progress
    from stcompress.stages import translate

    shown = []
    monkeypatch.setattr(translate, "run", lambda cfg, *, progress=True: shown.append(progress) or Path(cfg.output))
    monkeypatch.setattr(progress, "STATUS", progress.Status())
    assert cli.main(["translate", *MODEL, "--output", str(tmp_path / "o"), "-q"]) == 0
    assert shown == [False] and progress.STATUS.enabled  # no bars, the status line instead
