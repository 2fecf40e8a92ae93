"""`stcompress run` killed for real (SIGKILL to a subprocess's whole process group): between two
stages, and in the middle of a fine-tuning stage. The rerun of the same command must skip the
stages that finished, resume the interrupted one from its checkpoint, and end with every stage
complete. (tests/test_run.py covers the plan logic in-process with a KeyboardInterrupt.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from stcompress.artifacts import MANIFEST, file_hash, read_manifest
from stcompress.config import RunConfig
from stcompress.stages import run as runner

TIMEOUT = 120.0  # seconds to wait for a kill point, and for a rerun to finish
POLL = 0.02

DEFAULTS = {
    "model": {"device": "cpu"},
    "data": {"dataset": "builtin", "target_lang": "de", "test_size": 4, "split_seed": 0},
    "generation": {"max_new_tokens": 4, "batch_size": 4},
}


def _write_recipe(tmp_path: Path, stages: list[dict[str, Any]]) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "defaults": DEFAULTS, "stages": stages}))
    return path


def _command(recipe: Path) -> list[str]:
    return [sys.executable, "-m", "stcompress.cli", "run", str(recipe), "-q"]


def _start(recipe: Path, log: Path) -> subprocess.Popen:
    with open(log, "wb") as fh:  # a file, not a pipe: a full pipe would stall the child
        return subprocess.Popen(_command(recipe), cwd=recipe.parent, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL the child's whole process group (no handler, no cleanup runs) and reap it."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


def _wait_for(proc: subprocess.Popen, log: Path, what: str, ready: Callable[[], bool]) -> None:
    """Poll the run directory until `ready()`; fail if the run exits first or TIMEOUT passes."""
    deadline = time.monotonic() + TIMEOUT
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the run exited (rc {proc.returncode}) before {what}; make the stage slower via its config\n"
                        f"{log.read_text(errors='replace')[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {TIMEOUT:.0f} s waiting for {what}\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(POLL)


def _rerun(recipe: Path) -> str:
    done = subprocess.run(_command(recipe), cwd=recipe.parent, capture_output=True, text=True, timeout=TIMEOUT * 3)
    assert done.returncode == 0, f"the rerun failed (rc {done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def _plan(run_dir: Path) -> dict[str, Any]:
    path = run_dir / runner.PLAN
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet (it is written atomically)
        return {"stages": {}}


def _status(run_dir: Path, name: str) -> str | None:
    return _plan(run_dir)["stages"].get(name, {}).get("status")


def _snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    """Every file of a stage output: (mtime_ns, size); a rerun rewrites them all."""
    return {str(f.relative_to(directory)): (f.stat().st_mtime_ns, f.stat().st_size)
            for f in sorted(directory.rglob("*")) if f.is_file()}


def _plan_line(stdout: str, name: str) -> str:
    lines = [line for line in stdout.splitlines() if f". {name} " in line]
    assert len(lines) == 1, f"no plan line for {name} in the rerun's output:\n{stdout}"
    return lines[0]


def _assert_all_complete(recipe_path: Path) -> None:
    """Every stage: a manifest of the right stage/output that plan.json records as made by this run,
    so a further run would skip everything; plus the run's own manifest."""
    recipe = runner.parse_recipe(recipe_path)
    plan = _plan(recipe.run_dir)
    for step in recipe.steps:
        manifest = read_manifest(step.output)  # raises if missing
        assert manifest["stage"] == step.stage, f"{step.name}: manifest of stage {manifest['stage']}"
        assert manifest["config"]["output"] == str(step.output), f"{step.name}: manifest names another output"
        record = plan["stages"][step.name]
        assert record["status"] == "done", f"{step.name}: plan.json status {record['status']}"
        assert record["manifest_sha256"] == file_hash(step.output / MANIFEST)["sha256"], \
            f"{step.name}: plan.json records another manifest than the one on disk"
        left = [p.name for p in recipe.run_dir.glob(f".{step.name}.partial-*")]
        assert not left, f"{step.name}: staging directories of killed attempts are left behind: {left}"
    decisions = runner.decide(recipe, RunConfig(recipe=str(recipe_path)))
    assert set(decisions.values()) == {"skip: unchanged"}, f"a further run would not skip everything: {decisions}"
    assert (recipe.run_dir / MANIFEST).is_file(), "the run's manifest.json is missing"


# ---------------------------------------------------------------------------------------------


def test_kill_between_stages_then_rerun_skips_the_finished_stage(tmp_path, tiny_model_dir):
    recipe = _write_recipe(tmp_path, [
        {"name": "teacher", "stage": "finetune", "config": {
            "mode": "full", "model": {"path": str(tiny_model_dir)}, "data": {"subset": "train"},
            "dev": {"dataset": "none"},
            "train": {"max_steps": 2, "epochs": 1, "batch_size": 4, "lr": 1.0e-4, "check_segments": 1}}},
        {"name": "teacher-eval", "stage": "evaluate", "config": {
            "model": {"path": "${teacher.model}"}, "data": {"subset": "test"}, "metrics": ["chrf"]}},
        {"name": "importance", "stage": "importance", "config": {
            "model": {"path": "${teacher.model}"}, "data": {"subset": "test"}, "rounds": 1}},
        {"name": "prune", "stage": "prune", "config": {
            "importance": "${importance}", "model": {"path": "${teacher.model}"}, "num_layers": 1,
            "check_segments": 1, "check_max_new_tokens": 4}},
        {"name": "pruned-eval", "stage": "evaluate", "config": {
            "model": {"path": "${prune}"}, "data": {"subset": "test"}, "metrics": ["chrf"]}},
    ])
    run_dir = tmp_path / "run"
    teacher, nxt = run_dir / "teacher", run_dir / "teacher-eval"
    log = tmp_path / "first.log"

    proc = _start(recipe, log)
    try:
        # teacher is finished once its output is in place (atomic rename: manifest inside) and the
        # runner has recorded it; teacher-eval must not be finished yet
        _wait_for(proc, log, "teacher to complete",
                  lambda: (teacher / MANIFEST).is_file() and _status(run_dir, "teacher") == "done")
        _kill(proc)
    finally:
        _kill(proc)
    assert proc.returncode == -signal.SIGKILL, f"the run was not killed but exited with {proc.returncode}"
    assert not (nxt / MANIFEST).exists(), "teacher-eval finished before the kill: the test did not catch a stage boundary"

    before = {"manifest": (teacher / MANIFEST).read_bytes(), "files": _snapshot(teacher),
              "record": _plan(run_dir)["stages"]["teacher"]}
    assert before["record"]["manifest_sha256"] == file_hash(teacher / MANIFEST)["sha256"]
    assert runner.decide(runner.parse_recipe(recipe), RunConfig(recipe=str(recipe))) == {
        "teacher": "skip: unchanged", "teacher-eval": "run: no complete output", "importance": "run: no complete output",
        "prune": "run: no complete output", "pruned-eval": "run: no complete output"}

    stdout = _rerun(recipe)

    assert "[skip: unchanged]" in _plan_line(stdout, "teacher")
    for name in ("teacher-eval", "importance", "prune", "pruned-eval"):
        assert "[run: no complete output]" in _plan_line(stdout, name)
    # teacher was not rerun: not one of its files was rewritten, its plan record is the old one
    assert (teacher / MANIFEST).read_bytes() == before["manifest"], "teacher's manifest changed: teacher was rerun"
    assert _snapshot(teacher) == before["files"], "teacher's files were rewritten: teacher was rerun"
    record = _plan(run_dir)["stages"]["teacher"]
    assert record.pop("last_decision") == "skip: unchanged"
    assert record == before["record"], "plan.json's record of teacher changed: teacher was rerun"
    decisions = {k: v["decision"] for k, v in read_manifest(run_dir)["stages"].items()}
    assert decisions == {"teacher": "skip: unchanged", "teacher-eval": "run: no complete output",
                         "importance": "run: no complete output", "prune": "run: no complete output",
                         "pruned-eval": "run: no complete output"}
    # the stages that ran read the kept teacher
    assert read_manifest(run_dir / "prune")["inputs"]["model"]["path"] == str((teacher / "model").resolve())
    _assert_all_complete(recipe)


def test_kill_mid_finetune_then_rerun_resumes_from_its_checkpoint(tmp_path, tiny_model_dir):
    """Two kills: while ft trains (a checkpoint after every step), then, in the rerun, while ft writes
    its output (staging directory half full). Each rerun skips base-eval and continues ft."""
    steps = 10  # 8 training items, batch 1: ~1 s a step with a checkpoint after each
    recipe = _write_recipe(tmp_path, [
        {"name": "base-eval", "stage": "evaluate", "config": {
            "model": {"path": str(tiny_model_dir)}, "data": {"subset": "test"}, "metrics": ["chrf"]}},
        {"name": "ft", "stage": "finetune", "config": {
            "mode": "full", "model": {"path": str(tiny_model_dir)}, "data": {"subset": "train"},
            "dev": {"dataset": "none"},
            "train": {"max_steps": steps, "epochs": 2, "batch_size": 1, "lr": 1.0e-4, "save_every": 1,
                      "log_every": 1, "check_segments": 1}}},
        {"name": "ft-eval", "stage": "evaluate", "config": {
            "model": {"path": "${ft.model}"}, "data": {"subset": "test"}, "metrics": ["chrf"]}},
    ])
    run_dir = tmp_path / "run"
    base, ft, ckpts = run_dir / "base-eval", run_dir / "ft", run_dir / "ft.checkpoints"
    state_file = ckpts / "last" / "trainer_state.json"

    def checkpoint() -> dict[str, Any]:
        try:
            return json.loads(state_file.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):  # between checkpoint renames
            return {"step": 0}

    def staging() -> list[Path]:
        return list(run_dir.glob(".ft.partial-*"))

    def weights_saved() -> bool:  # ft's output half written: weights saved (staged, or wrongly in place)
        return any(list(d.glob("model/*.safetensors")) and (d / "model" / "config.json").is_file()
                   for d in [*staging(), ft])

    def assert_ft_incomplete(when: str) -> None:
        assert not ft.exists(), f"{when}: ft's final output directory exists although ft never finished"
        assert _plan(run_dir)["stages"]["ft"]["status"] == "running", f"{when}: plan.json does not show ft unfinished"
        assert runner.decide(runner.parse_recipe(recipe), RunConfig(recipe=str(recipe))) == {
            "base-eval": "skip: unchanged", "ft": "run: no complete output", "ft-eval": "run: no complete output"}, when

    # 1. killed while training
    log = tmp_path / "first.log"
    proc = _start(recipe, log)
    try:
        _wait_for(proc, log, "ft's checkpoint at step 2", lambda: checkpoint()["step"] >= 2)
        _kill(proc)
    finally:
        _kill(proc)
    assert proc.returncode == -signal.SIGKILL, f"the run was not killed but exited with {proc.returncode}"
    assert_ft_incomplete("killed while training")
    killed_at = checkpoint()["step"]
    assert 2 <= killed_at < steps, f"the checkpoint on disk is at step {killed_at}; expected one mid-training"
    before = {"manifest": (base / MANIFEST).read_bytes(), "files": _snapshot(base),
              "record": _plan(run_dir)["stages"]["base-eval"]}
    assert before["record"]["status"] == "done"

    # 2. the rerun, killed while ft writes its output (training finished, weights staged)
    log = tmp_path / "second.log"
    proc = _start(recipe, log)
    try:
        _wait_for(proc, log, "ft's saved weights", weights_saved)
        _kill(proc)
    finally:
        _kill(proc)
    assert proc.returncode == -signal.SIGKILL, f"the rerun was not killed but exited with {proc.returncode}"
    assert "[skip: unchanged]" in _plan_line(log.read_text(), "base-eval")
    assert "[run: no complete output]" in _plan_line(log.read_text(), "ft")
    assert_ft_incomplete("killed while writing the output")
    assert staging(), "the killed attempt's staging directory is gone, so this was not a kill mid-write"
    assert checkpoint()["step"] == steps and checkpoint()["finished"], "ft's last checkpoint is not the finished one"
    assert checkpoint()["resumed_from"] == [killed_at], "the first rerun did not resume ft from its checkpoint"

    # 3. the rerun to the end
    stdout = _rerun(recipe)

    assert "[skip: unchanged]" in _plan_line(stdout, "base-eval")
    assert "[run: no complete output]" in _plan_line(stdout, "ft")
    assert (base / MANIFEST).read_bytes() == before["manifest"], "base-eval's manifest changed: base-eval was rerun"
    assert _snapshot(base) == before["files"], "base-eval's files were rewritten: base-eval was rerun"
    record = _plan(run_dir)["stages"]["base-eval"]
    assert record.pop("last_decision") == "skip: unchanged"
    assert record == before["record"], "plan.json's record of base-eval changed: base-eval was rerun"

    # ft continued from the checkpoints the kills left, not from scratch, and trained every step once
    training = read_manifest(ft)["training"]
    assert training["resumed_from_steps"] == [killed_at, steps], \
        f"ft did not resume from its checkpoints (steps {killed_at}, {steps}): {training['resumed_from_steps']}"
    assert training["steps"] == steps
    history = [json.loads(line) for line in (ft / "history.jsonl").read_text().splitlines() if line.strip()]
    assert [r["step"] for r in history if r["kind"] == "train"] == list(range(1, steps + 1))
    assert not ckpts.exists(), "ft's checkpoints were not removed after it completed"
    decisions = {k: v["decision"] for k, v in read_manifest(run_dir)["stages"].items()}
    assert decisions == {"base-eval": "skip: unchanged", "ft": "run: no complete output",
                         "ft-eval": "run: no complete output"}
    _assert_all_complete(recipe)  # the killed attempt's staging directory included
