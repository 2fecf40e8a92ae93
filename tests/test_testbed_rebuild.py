"""CPU rebuild of testbed systems from the base model + collected artifacts (issue 10, point 5).

The real chain runs on the tiny smoke testbed (benchmarks/testbed/smoke_cpu.py's base: a tiny
Gemma 3 in the testbed's pack -> model path): projector warm-up with the LM frozen, LoRA teacher,
fp32 merge, importance, prune, QLoRA heal, fp32 merge. collect_artifacts packs what the GPU driver
keeps (adapters cast to fp16); `rebuild` must give back the teacher and final25 the pipeline made:
the same greedy translations, and weights within the fp16 rounding of the adapters.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import yaml

from stcompress import cli
from stcompress.errors import ModelError

ROOT = Path(__file__).resolve().parents[1]
TRAIN = {"epochs": 1, "max_steps": 2, "batch_size": 2, "lr": 0.05, "warmup_steps": 0, "weight_decay": 0.0,
         "freeze_audio_tower": True, "cache_audio": True, "mixed_precision": "no", "log_every": 1}
DATA = {"dataset": "builtin:demo-train", "limit": 4}
CHECK = {"dataset": "builtin:demo-dev", "limit": 2}


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "testbed" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _collected(run: Path, root: Path, name: str) -> Path:
    """What the GPU driver keeps of `run` (collect_artifacts' volumes), unpacked into root/artifacts."""
    collect = _script("collect_artifacts")
    artifacts = root / "artifacts"
    for f in collect.pack(collect.collect(run, []), root / "out", name):
        with tarfile.open(f) as tar:
            tar.extractall(artifacts, filter="data")
    return artifacts


LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "rslora": True, "targets": ["all-linear"], "audio_tower": False}
DEFAULTS = {"model": {"dtype": "float32", "device": "cpu"}, "data": {"target_lang": "de"},
            "generation": {"max_new_tokens": 6, "batch_size": 4}}


def _recipe(base: Path, run_dir: Path) -> dict:
    lora = LORA
    return {
        "run_dir": str(run_dir),
        "defaults": DEFAULTS,
        "stages": [
            {"name": "align", "stage": "finetune", "config": {
                "mode": "full", "model": {"path": str(base)}, "data": DATA, "dev": {"dataset": "none"},
                "train": TRAIN | {"freeze_language_model": True, "save_dtype": "float32"}}},
            {"name": "teacher", "stage": "finetune", "config": {
                "mode": "lora", "model": {"path": "${align.model}"}, "data": DATA, "dev": {"dataset": "none"},
                "lora": lora, "train": TRAIN}},
            {"name": "teacher-merged", "stage": "export", "config": {"input": "${teacher}", "dtype": "float32", "data": CHECK}},
            {"name": "importance", "stage": "importance", "config": {
                "model": {"path": "${teacher-merged}"}, "data": CHECK, "rounds": 2, "generation": {"max_new_tokens": 4}}},
            {"name": "prune25", "stage": "prune", "config": {
                "importance": "${importance}", "num_layers": 2, "model": {"path": "${teacher-merged}"}, "data": CHECK}},
            {"name": "heal25", "stage": "finetune", "config": {
                "mode": "qlora", "model": {"path": "${prune25}"}, "data": DATA, "dev": {"dataset": "none"},
                "lora": lora | {"keep_unquantized": ["lm_head", "audio_tower"]}, "train": TRAIN}},
            {"name": "export25", "stage": "export", "config": {"input": "${heal25}", "dtype": "float32", "data": CHECK}},
        ],
    }


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    pytest.importorskip("bitsandbytes")  # QLoRA healing, as on the GPU (extra `quant`, installed by CI)
    root = tmp_path_factory.mktemp("rebuild")
    sys.path.insert(0, str(ROOT / "tests"))
    base = _script("smoke_cpu").tiny_base(root / "model")
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(base, root / "run")))
    assert cli.main(["run", str(recipe), "-q"]) == 0
    return base, root / "run", _collected(root / "run", root, "testbed-tiny")


def _state(path: Path) -> dict[str, torch.Tensor]:
    from transformers import Qwen2AudioForConditionalGeneration

    return Qwen2AudioForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32).state_dict()


def _translate(model: Path, out: Path) -> list[str]:
    assert cli.main(["translate", "--model.path", str(model), "--model.device", "cpu", "--data.dataset", "builtin:demo-test",
                     "--data.limit", "4", "--generation.max-new-tokens", "8", "--output", str(out), "-q"]) == 0
    return [json.loads(l)["hypothesis"] for l in (out / "hypotheses.jsonl").read_text().splitlines()]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.slow  # the pipeline fixture runs 7 real stages: ~1.5 min on 2 cores, ~4 under heavy load
def test_collected_artifacts_are_small_and_fp16(pipeline):
    from safetensors import safe_open

    _, run, artifacts = pipeline
    assert (artifacts / "projector.safetensors").is_file() and not list(artifacts.glob("*/model"))
    with safe_open(str(artifacts / "projector.safetensors"), "pt") as f:
        assert f.metadata()["stage"] == "align" and all("multi_modal_projector." in k for k in f.keys())
    for stage in ("teacher", "heal25"):
        with safe_open(str(artifacts / stage / "adapter" / "adapter_model.safetensors"), "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    assert json.loads((artifacts / "prune25" / "manifest.json").read_text())["removed_layers"]
    assert (artifacts / "importance" / "removal_order.json").is_file() and (artifacts / "importance" / "hypotheses").is_dir()
    assert not [p for p in artifacts.rglob("*.safetensors") if p.name not in ("adapter_model.safetensors", "projector.safetensors")]


@pytest.mark.slow
@pytest.mark.parametrize("system, made", [("teacher", "teacher-merged"), ("final25", "export25")])
def test_rebuild_on_cpu_matches_what_the_pipeline_made(pipeline, tmp_path, system, made):
    from stcompress.testbed.model import NOTICE

    base, run, artifacts = pipeline
    out = tmp_path / system
    assert cli_rebuild(base, artifacts, system, out) == 0
    assert (out / "NOTICE").read_text() == NOTICE
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rebuilt"]["stage"] == made and "NOTICE" in manifest["files"]
    rebuilt, original = _state(out), _state(run / made)
    # the adapters' fp16 rounding is all that differs; the merge itself moved the weights far more
    before = _state(run / "align" / "model") if system == "teacher" else _state(run / "prune25")
    moved = _max_diff(original, before)
    assert moved > 1e-3 and _max_diff(rebuilt, original) < 1e-2 * moved
    if system == "final25":
        assert manifest["removed_layers"] == json.loads((artifacts / "prune25" / "manifest.json").read_text())["removed_layers"]
    assert _translate(out, tmp_path / "hyp-rebuilt") == _translate(run / made, tmp_path / "hyp-pipeline")


def cli_rebuild(base, artifacts, system, out):
    from stcompress.testbed.__main__ import main

    return main(["rebuild", "--base", str(base), "--artifacts", str(artifacts), "--system", system, "--out", str(out)])


def test_rebuild_refuses_bad_input_in_one_line(tmp_path, capsys):
    base, artifacts = tmp_path / "base", tmp_path / "artifacts"
    base.mkdir()
    (base / "config.json").write_text("{}")
    (artifacts / "export25").mkdir(parents=True)
    (artifacts / "export25" / "manifest.json").write_text(json.dumps({"stage": "export", "config": {"quantize": "nf4"}}))
    (artifacts / "distill").mkdir()
    (artifacts / "distill" / "manifest.json").write_text(json.dumps({"stage": "distill"}))
    assert cli_rebuild(base, artifacts, "final99", tmp_path / "x") == 2
    err = capsys.readouterr().err
    assert "system: 'final99' has no manifest" in err and "final25" in err and not (tmp_path / "x").exists()
    (tmp_path / "taken").mkdir()
    assert cli_rebuild(base, artifacts, "final25", tmp_path / "taken") == 2
    assert "already exists" in capsys.readouterr().err
    assert cli_rebuild(tmp_path, artifacts, "final25", tmp_path / "y") == 2
    assert "is not a model directory" in capsys.readouterr().err
    assert cli_rebuild(base, artifacts, "final25", tmp_path / "z") == 2
    assert "a quantized (nf4) export" in capsys.readouterr().err
    assert cli_rebuild(base, artifacts, "distill", tmp_path / "z") == 2
    assert "a distill stage makes no model" in capsys.readouterr().err
    assert not (tmp_path / "y").exists() and not (tmp_path / "z").exists() and not list(tmp_path.glob(".*"))


def test_pack_fills_at_most_four_volumes_and_refuses_more(tmp_path, monkeypatch):
    import os

    collect = _script("collect_artifacts")
    monkeypatch.setattr(collect, "MAX_BYTES", 16_000)
    monkeypatch.setattr(collect, "BUDGET", 15_500)
    files = {f"stage{i}/adapter/adapter_model.safetensors": os.urandom(7_000) for i in range(5)} | {"plan.json": b"{}"}
    written = collect.pack(files, tmp_path / "out", "tb")
    assert [p.name for p in written] == ["tb-artifacts.tar.gz", "tb-artifacts-2.tar.gz", "tb-artifacts-3.tar.gz"]
    got = {}
    for p in written:
        assert p.stat().st_size <= 16_000
        with tarfile.open(p) as tar:
            got |= {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    assert got == files
    four = collect.pack(files | {f"more{i}.bin": os.urandom(7_000) for i in range(2)}, tmp_path / "out4", "tb")
    assert len(four) == 4
    with pytest.raises(SystemExit, match="need 5 files"):
        collect.pack(files | {f"more{i}.bin": os.urandom(7_000) for i in range(4)}, tmp_path / "out2", "tb")
    assert not (tmp_path / "out2").exists()


def test_adapters_are_cast_to_fp16_unless_fp16_cannot_hold_them(tmp_path):
    from safetensors.torch import load_file, save_file

    collect = _script("collect_artifacts")
    path = tmp_path / "adapter_model.safetensors"
    save_file({"a": torch.full((2, 2), 0.1), "big": torch.full((2,), 1e6)}, str(path))
    back = {}
    (tmp_path / "cast.safetensors").write_bytes(collect.fp16_adapter(path))
    back = load_file(str(tmp_path / "cast.safetensors"))
    assert back["a"].dtype == torch.float16 and torch.allclose(back["a"].float(), torch.full((2, 2), 0.1), rtol=1e-3)
    assert back["big"].dtype == torch.float32  # 1e6 overflows fp16: kept as it was


def _recipe_run3(base: Path, run_dir: Path) -> dict:
    """Run 3's teacher chain: LoRA + the projector's own weights (ASR warm-up), merged, then a LoRA +
    projector teacher on it, merged. No frozen-LM stage: the projector lives in the adapters."""
    lora = LORA | {"train_projector": True}
    return {
        "run_dir": str(run_dir),
        "defaults": DEFAULTS,
        "stages": [
            {"name": "asr", "stage": "finetune", "config": {
                "mode": "lora", "model": {"path": str(base)}, "data": DATA, "dev": {"dataset": "none"}, "lora": lora,
                "train": TRAIN}},
            {"name": "asr-merged", "stage": "export", "config": {"input": "${asr}", "dtype": "float32", "data": CHECK}},
            {"name": "teacher", "stage": "finetune", "config": {
                "mode": "lora", "model": {"path": "${asr-merged}"}, "data": DATA, "dev": {"dataset": "none"},
                "lora": lora, "train": TRAIN}},
            {"name": "teacher-merged", "stage": "export", "config": {"input": "${teacher}", "dtype": "float32", "data": CHECK}},
            {"name": "distill", "stage": "distill", "config": {"model": {"path": "${teacher-merged}"}, "data": DATA}},
        ],
    }


@pytest.fixture(scope="module")
def run3_chain(tmp_path_factory):
    """Run 3's teacher chain on the tiny testbed (four real stages, ~1 min on 2 cores), collected."""
    root = tmp_path_factory.mktemp("run3")
    sys.path.insert(0, str(ROOT / "tests"))
    base = _script("smoke_cpu").tiny_base(root / "model")
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(_recipe_run3(base, Path("run"))))  # relative, as the GPU driver's recipes
    here = os.getcwd()
    os.chdir(root)
    try:
        assert cli.main(["run", str(recipe), "-q"]) == 0
    finally:
        os.chdir(here)
    return base, root / "run", _collected(root / "run", root, "tb")


@pytest.mark.slow
def test_rebuild_replays_a_chain_of_adapters_that_train_the_projector(run3_chain, tmp_path):
    """The teacher of run 3's recipes (two adapters, each carrying projector weights) comes back
    from the base + the collected artifacts alone: the same translations, weights within fp16 rounding."""
    from safetensors import safe_open

    base, run, artifacts = run3_chain
    assert not (artifacts / "projector.safetensors").exists()  # no frozen-LM warm-up in this chain
    for stage in ("asr", "teacher"):
        with safe_open(str(artifacts / stage / "adapter" / "adapter_model.safetensors"), "pt") as f:
            assert any("multi_modal_projector" in k and "lora_" not in k for k in f.keys())
    out = tmp_path / "rebuilt"
    assert cli_rebuild(base, artifacts, "teacher", out) == 0
    rebuilt, original = _state(out), _state(run / "teacher-merged")
    moved = _max_diff(original, _state(base))
    assert moved > 1e-3 and _max_diff(rebuilt, original) < 1e-2 * moved
    proj = [k for k in original if "multi_modal_projector" in k]
    assert proj and _max_diff({k: rebuilt[k] for k in proj}, {k: original[k] for k in proj}) < 1e-2 * moved
    assert _translate(out, tmp_path / "hyp-rebuilt") == _translate(run / "teacher-merged", tmp_path / "hyp-run")


def cli_seed(base, artifacts, run_dir, stages):
    from stcompress.testbed.__main__ import main

    return main(["seed", "--base", str(base), "--artifacts", str(artifacts), "--run-dir", str(run_dir), "--stages", stages])


def test_seed_gives_a_fresh_run_dir_the_finished_stages_and_the_recipe_continues_after_them(run3_chain, tmp_path, capsys,
                                                                                           monkeypatch):
    """A later GPU stretch starts on a bare machine: `seed` puts the collected stages (merged weights
    rebuilt) into a new run directory, the runner skips them and runs only what comes after."""
    from stcompress.config import RunConfig
    from stcompress.stages import run as runner

    base, run, artifacts = run3_chain
    monkeypatch.chdir(tmp_path)  # the same relative run_dir as the run that made the artifacts
    fresh = tmp_path / "run"
    recipe = _recipe_run3(base, Path("run"))
    recipe["stages"].append({"name": "teacher-eval", "stage": "evaluate", "config": {
        "model": {"path": "${teacher-merged}"}, "data": CHECK}})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))

    assert cli_seed(base, artifacts, fresh, "asr,asr-typo") == 2  # checked before anything is written
    err = capsys.readouterr().err
    assert "asr-typo is not a finished stage" in err and "teacher-merged" in err and not fresh.exists()

    # the real run's KD set is over collect_artifacts' size cap: seed translates it again
    kept = tmp_path / "artifacts"
    shutil.copytree(artifacts, kept)
    for f in ("examples.jsonl", "hypotheses.jsonl"):
        (kept / "distill" / f).unlink()
    artifacts = kept

    assert cli_seed(base, artifacts, fresh, "asr,asr-merged,teacher,teacher-merged,distill") == 0
    assert runner.decide(runner.parse_recipe(path), RunConfig(recipe=str(path))) == {
        "asr": "skip: unchanged", "asr-merged": "skip: unchanged", "teacher": "skip: unchanged",
        "teacher-merged": "skip: unchanged", "distill": "skip: unchanged", "teacher-eval": "run: no complete output"}
    assert (fresh / "distill" / "examples.jsonl").read_text() == (run / "distill" / "examples.jsonl").read_text()
    for stage in ("asr-merged", "teacher-merged"):  # every file the manifest lists is there again
        listed = json.loads((fresh / stage / "manifest.json").read_text())["files"]
        assert "model.safetensors" in listed and all((fresh / stage / f).is_file() for f in listed)
        assert (fresh / stage / "manifest.json").read_bytes() == (run / stage / "manifest.json").read_bytes()
    assert (fresh / "teacher" / "adapter" / "tokenizer.json").is_file()
    seeded = json.loads((fresh / "seeded.json").read_text())["stages"]
    assert seeded["teacher-merged"]["rebuilt"] == ["chat_template.jinja", "model.safetensors", "tokenizer.json"]
    assert seeded["distill"]["rebuilt"] == ["examples.jsonl", "hypotheses.jsonl"]
    assert seeded["distill"]["counts_rebuilt"] == seeded["distill"]["counts_recorded"]
    assert _translate(fresh / "teacher-merged", tmp_path / "hyp-seeded") == _translate(run / "teacher-merged", tmp_path / "hyp-run")
    assert not [p.name for p in fresh.iterdir() if p.name.startswith(".")]  # no temp left

    weights = fresh / "teacher-merged" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert cli_seed(base, artifacts, fresh, "teacher-merged") == 0  # again: what is there stays
    assert "nothing new" in capsys.readouterr().out and weights.stat().st_mtime_ns == before
    assert cli_seed(base, artifacts, tmp_path / "all", "all") == 0  # every finished stage, in the run's order
    assert "seeded " + str(tmp_path / "all") + ": asr, asr-merged, teacher, teacher-merged, distill" in capsys.readouterr().out

    assert cli.main(["run", str(path), "-q"]) == 0
    assert (fresh / "teacher-eval" / "scores.json").is_file()
    plan = json.loads((fresh / "plan.json").read_text())["stages"]
    assert plan["teacher-merged"]["last_decision"] == "skip: unchanged"
