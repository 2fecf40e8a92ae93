"""Nothing silently wrong after a fault (issue 9): resume state bound to its inputs' content and
checked against checksums, and stages killed for real at their fault points (inside every atomic
write, between the renames, mid-append) then rerun: the result equals an uninterrupted run's bit
for bit, or the rerun refuses with one clear line.

Kills use the test-only hook in `artifacts.fault_point`: STCOMPRESS_FAULT_AT=N makes the Nth point
`os._exit` (no cleanup runs, like SIGKILL); STCOMPRESS_FAULT_LOG lists the points a clean run
reaches. CI kills a sample of the points; `pytest -m slow tests/test_faults.py` kills every one
and writes the counts to benchmarks/faults.md's format (see FAULTS_REPORT).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from stcompress.artifacts import FAULT_AT, FAULT_LOG, MANIFEST
from stcompress.config import FinetuneConfig, load_config
from stcompress.errors import StcompressError
from stcompress.stages import finetune
from stcompress.training import checkpoint as ckpt

TARGETS = ("Hallo Welt.", "Guten Morgen, wie geht es?", "Danke schön.")


def _manifest(directory: Path) -> Path:
    from conftest import speech_like
    import soundfile as sf

    rows = []
    for i, t in enumerate(TARGETS):
        sf.write(str(directory / f"c{i}.wav"), speech_like(1.0 + 0.3 * i, seed=i), 16000, subtype="FLOAT")
        rows.append({"id": f"u{i}", "audio": f"c{i}.wav", "text_de": t})
    path = directory / "train.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def _ft_cfg(out: Path, manifest: Path, model: Path, **overrides: str) -> FinetuneConfig:
    base = {"mode": "lora", "output": str(out), "data.dataset": str(manifest), "model.device": "cpu", "lora.r": "4",
            "lora.alpha": "8", "train.batch_size": "1", "train.epochs": "1", "train.save_every": "2",
            "train.lr": "1e-2", "train.scheduler": "constant", "dev.dataset": "none", "train.check_segments": "1",
            "model.path": str(model)}
    return load_config(FinetuneConfig, None, {**base, **overrides})


class Killed(Exception):
    pass


def _kill_at(step: int):
    def on_step(state):
        if state.step == step:
            raise Killed

    return on_step


@pytest.fixture(scope="module")
def killed_finetune(tmp_path_factory, tiny_model_dir):
    """A LoRA run killed after step 3 (the checkpoint of step 2 saved), on a private model copy."""
    root = tmp_path_factory.mktemp("killed")
    model = root / "model"
    shutil.copytree(tiny_model_dir, model)
    manifest = _manifest(root)
    with pytest.raises(Killed):
        finetune.run(_ft_cfg(root / "out", manifest, model), progress=False, on_step=_kill_at(3))
    return root / "out.checkpoints", manifest, model


@pytest.fixture
def interrupted(killed_finetune, tmp_path):
    """(config, model dir, checkpoint dir): a private copy of the killed run's checkpoints."""
    ckpt_dir, manifest, model = killed_finetune
    cfg = _ft_cfg(tmp_path / "out", manifest, model)
    shutil.copytree(ckpt_dir, tmp_path / "out.checkpoints")
    return cfg, model, tmp_path / "out.checkpoints"


def _flip_byte(path: Path, where: float = 0.6) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0x01
    path.write_bytes(bytes(data))


def _tamper(last: Path, name: str) -> None:
    path = last / name
    if name == ckpt.STATE_FILE:  # a plausible edit, valid JSON
        state = json.loads(path.read_text())
        state["step"] += 4
        path.write_text(json.dumps(state))
    elif name == "truncated optimizer.bin":
        path = last / "optimizer.bin"
        path.write_bytes(path.read_bytes()[:100])
    elif name == "deleted scheduler.bin":
        (last / "scheduler.bin").unlink()
    else:
        _flip_byte(path)


@pytest.mark.parametrize("name", [ckpt.STATE_FILE, "model.safetensors", "optimizer.bin", "truncated optimizer.bin",
                                  "deleted scheduler.bin", "random_states_0.pkl", ckpt.CHECKSUMS])
def test_tampered_checkpoint_is_refused_naming_the_file(interrupted, name, capsys):
    """Every file a finetune resume reads is checked against checksums.json first (issue 9 item 6)."""
    cfg, _, ckpt_dir = interrupted
    last = ckpt_dir / ckpt.LAST
    assert sorted(p.name for p in last.iterdir()) == sorted(
        ["checksums.json", "model.safetensors", "optimizer.bin", "random_states_0.pkl", "scheduler.bin", ckpt.STATE_FILE])
    _tamper(last, name)
    shown = name.split()[-1]
    with pytest.raises(StcompressError, match=f"checkpoint: .*{shown} (is missing|does not match)|{shown} is missing or corrupt"):
        finetune.run(cfg, progress=False)
    assert not Path(cfg.output).exists()


def test_finetune_resume_refuses_other_weights_at_the_same_path(interrupted, tiny_model_dir):
    """A checkpoint is bound to the content of the model it trains (an upstream stage that reran
    leaves other weights at the same path); train.resume: never starts over (issue 9 item 5)."""
    from stcompress.model.tiny import tiny_model_cache

    cfg, model, ckpt_dir = interrupted
    kept = model.with_name("model.kept")
    os.replace(model, kept)
    try:
        shutil.copytree(tiny_model_cache(seed=5), model)
        with pytest.raises(StcompressError, match=r"trained on other inputs \(the content of model changed since\)"):
            finetune.run(cfg, progress=False)
        restart = _ft_cfg(Path(cfg.output), Path(cfg.data.dataset), model, **{"train.resume": "never"})
        out = finetune.run(restart, progress=False)
        assert json.loads((out / MANIFEST).read_text())["training"]["resumed_from_steps"] == []
    finally:
        shutil.rmtree(model, ignore_errors=True)
        os.replace(kept, model)


# -- kills at fault points ---------------------------------------------------------------------

DEFAULTS = {"model": {"device": "cpu"}, "data": {"dataset": "builtin", "target_lang": "de", "test_size": 2, "split_seed": 0},
            "generation": {"max_new_tokens": 4, "batch_size": 4}}
CHECK = {"check_segments": 1, "check_max_new_tokens": 4}


def _recipe(tmp_path: Path, model: Path) -> Path:
    """finetune -> importance -> prune -> distill -> export: every stage that writes state or weights."""
    import yaml

    stages = [
        {"name": "teacher", "stage": "finetune", "config": {
            "mode": "full", "model": {"path": str(model)}, "data": {"subset": "train", "limit": 4}, "dev": {"dataset": "none"},
            "train": {"max_steps": 3, "epochs": 1, "batch_size": 2, "save_every": 1, "lr": 1.0e-4, "check_segments": 1}}},
        {"name": "importance", "stage": "importance", "config": {
            "model": {"path": "${teacher.model}"}, "data": {"subset": "test"}, "rounds": 1}},
        {"name": "prune", "stage": "prune", "config": {
            "importance": "${importance}", "model": {"path": "${teacher.model}"}, "num_layers": 1, **CHECK}},
        {"name": "kd", "stage": "distill", "config": {"model": {"path": "${prune}"}, "data": {"subset": "train", "limit": 2}}},
        {"name": "export", "stage": "export", "config": {"input": "${teacher}", "dtype": "float32", "device": "cpu", **CHECK}},
    ]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "defaults": DEFAULTS, "stages": stages}))
    return path


def _stcompress(recipe: Path, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in (FAULT_AT, FAULT_LOG)}
    return subprocess.run([sys.executable, "-m", "stcompress.cli", "run", str(recipe), "-q"], cwd=recipe.parent,
                          env={**full, **env}, capture_output=True, text=True, timeout=900)


def _tensors(path: Path) -> dict[str, bytes]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        return {k: fh.get_tensor(k).contiguous().view(torch.uint8).numpy().tobytes() for k in fh.keys()}


_VOLATILE = {"seconds", "train_seconds", "created", "timings"}


def _strip(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in _VOLATILE}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def outputs(run_dir: Path) -> dict[str, Any]:
    """What a run produced that must not depend on faults: every weight tensor's bytes, every
    hypotheses / candidates / removal-order / example file (times left out); not the search's own
    resume state, whose checksums cover timings."""
    out: dict[str, Any] = {}
    for f in sorted(run_dir.rglob("*")):
        rel = str(f.relative_to(run_dir))
        if not f.is_file() or any(p.startswith(".") for p in f.relative_to(run_dir).parts) or ".checkpoints" in rel:
            continue
        if f.suffix == ".safetensors":
            out[rel] = _tensors(f)
        elif f.name == "search.json" or f.name.startswith("candidates.rank"):
            continue  # resume state: input hashes cover model-card timestamps, line checksums cover timings
        elif f.suffix == ".jsonl" and f.name != "history.jsonl":
            out[rel] = [_strip(json.loads(l)) for l in f.read_text().splitlines() if l.strip()]
        elif f.name in ("removal_order.json", "baseline.json"):
            out[rel] = _strip(json.loads(f.read_text()))
        elif f.name == "history.jsonl":
            out[rel] = [(r.get("step"), r.get("ce")) for r in map(json.loads, f.read_text().splitlines())]
    return out


def _kill_chain(recipe: Path, schedule: list[str]) -> dict[str, int]:
    """Run the recipe once per entry of `schedule`, each process killed at that fault point, then
    once more to the end. Every process must either die at its point (rc 137) or finish (rc 0)."""
    counts = {"kills": 0, "survived": 0, "finished_early": 0}
    for at in schedule:
        done = _stcompress(recipe, **{FAULT_AT: at})
        if done.returncode == 0:
            counts["finished_early"] += 1
            print("finished before its fault point:", at)
            continue
        assert done.returncode == 137, f"killed at {at}: rc {done.returncode}\n{done.stderr[-3000:]}"
        counts["kills"] += 1
        counts["survived"] += 1  # the next process must go on from here: checked by its rc
    final = _stcompress(recipe)
    assert final.returncode == 0, f"the rerun after the kills failed:\n{final.stderr[-3000:]}"
    return counts


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, tiny_model_dir):
    """The uninterrupted run, with the list of fault points it passes."""
    root = tmp_path_factory.mktemp("clean")
    recipe = _recipe(root, tiny_model_dir)
    done = _stcompress(recipe, **{FAULT_LOG: str(root / "points.txt")})
    assert done.returncode == 0, done.stderr[-3000:]
    return outputs(root / "run"), (root / "points.txt").read_text().splitlines()


# One kill per kind of fault point, in pipeline order; each entry is killed in its own process.
# Each is reached by the rerun that follows the previous kill (a resumed finetune saves again).
CI_SCHEDULE = ["between renames last:1", "write trainer_state.json:1", "rename teacher:1", "write search.json:1",
               "append:2", "write removal_order.json:1", "rename prune:1", "write examples.jsonl:1", "write README.md:1",
               "rename export:1"]


def test_run_killed_at_fault_points_ends_bit_identical(clean_run, tmp_path, tiny_model_dir):
    """`stcompress run` killed inside atomic writes, between renames and mid-append, in every stage
    (finetune, importance, prune, distill, export), ten times in a row: the outputs equal the
    uninterrupted run's bit for bit (weights, hypotheses, scores, removal order)."""
    reference, points = clean_run
    assert all(any(at.rpartition(":")[0] in p for p in points) for at in CI_SCHEDULE)
    recipe = _recipe(tmp_path, tiny_model_dir)
    counts = _kill_chain(recipe, CI_SCHEDULE)
    print("kill chain counts", counts)
    assert counts["kills"] == len(CI_SCHEDULE) and counts["finished_early"] == 0
    got = outputs(tmp_path / "run")
    assert got.keys() == reference.keys()
    assert [k for k in got if got[k] != reference[k]] == []
    assert not [p for p in (tmp_path / "run").rglob(".*.tmp")]


@pytest.mark.slow
def test_soak_every_fault_point(clean_run, tmp_path, tiny_model_dir):
    """Each fault point of a clean run killed on its own (a fresh run per point), then rerun."""
    reference, points = clean_run
    counts = {"tried": 0, "survived": 0, "identical": 0}
    for n in range(1, len(points) + 1):
        root = tmp_path / f"p{n}"
        root.mkdir()
        recipe = _recipe(root, tiny_model_dir)
        killed = _stcompress(recipe, **{FAULT_AT: str(n)})
        assert killed.returncode == 137, f"point {n} ({points[n - 1]}) was not reached: rc {killed.returncode}"
        counts["tried"] += 1
        rerun = _stcompress(recipe)
        assert rerun.returncode == 0, f"rerun after a kill at {n} ({points[n - 1]}): {rerun.stderr[-2000:]}"
        counts["survived"] += 1
        counts["identical"] += outputs(root / "run") == reference
        shutil.rmtree(root)
    print("soak counts", counts)
    assert counts["identical"] == counts["tried"] == len(points)


def test_run_refuses_partial_downstream_state_after_its_upstream_reran(tmp_path, monkeypatch):
    """In `stcompress run`, an importance search interrupted on one pruned model must not be
    continued on another one after its upstream stage reran into the same path (issue 9 item 5)."""
    import yaml

    from stcompress.config import RunConfig
    from stcompress.importance import evaluator as ev
    from stcompress.model.tiny import tiny_model_cache
    from stcompress.stages import run as runner

    six = tiny_model_cache(text_layers=6, seed=3)

    def write(layers: list[int], restart: bool = False) -> Path:
        stages = [
            {"name": "small", "stage": "prune", "config": {"model": {"path": str(six)}, "layers": layers, **CHECK}},
            {"name": "importance", "stage": "importance", "config": {
                "model": {"path": "${small}"}, "data": {"subset": "test"}, "rounds": 1, "restart": restart}},
        ]
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "defaults": DEFAULTS, "stages": stages}))
        return path

    real, calls = ev.GenerationEvaluator.evaluate, []

    def dying(self, removed, n):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(removed)
        return real(self, removed, n)

    monkeypatch.setattr(ev.GenerationEvaluator, "evaluate", dying)
    with pytest.raises(KeyboardInterrupt):
        runner.run(RunConfig(recipe=str(write([1]))), progress=False)
    monkeypatch.setattr(ev.GenerationEvaluator, "evaluate", real)
    assert (tmp_path / "run" / "importance" / "candidates.rank0.jsonl").is_file()
    with pytest.raises(StcompressError, match=r"holds a search of other inputs \(the content of the model changed"):
        runner.run(RunConfig(recipe=str(write([2]))), progress=False)  # prune reruns: other weights, same path
    runner.run(RunConfig(recipe=str(write([2], restart=True))), progress=False)
    rows = [json.loads(l) for l in (tmp_path / "run" / "importance" / "candidates.jsonl").read_text().splitlines()]
    assert json.loads((tmp_path / "run" / "importance" / MANIFEST).read_text())["resumed"] is False and len(rows) == 4
