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
