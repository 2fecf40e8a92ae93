"""Sharded full fine-tuning (FSDP2 through accelerate) on CPU: 2 torchrun processes with gloo train the
tiny model like one process with twice the batch, resume after a kill, and save a consolidated model
that plain from_pretrained loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from stcompress.artifacts import read_manifest
from stcompress.config import FinetuneConfig, load_config
from stcompress.errors import ConfigError
from stcompress.stages import finetune

TARGETS = ("Hallo Welt.", "Guten Morgen, wie geht es?", "Danke schön.", "Bis morgen, auf Wiedersehen!")
SCRIPT = """import os, sys, torch
torch.set_num_threads(1)
from stcompress.config import FinetuneConfig, load_config
from stcompress.stages import finetune
stop = int(os.environ.get("STOP_AT", "0"))
def on_step(state):
    if state.step == stop:  # a kill right after the checkpoint of this step (every process)
        os._exit(3)
finetune.run(load_config(FinetuneConfig, None, dict(a.split("=", 1) for a in sys.argv[1:])), progress=False, on_step=on_step)
"""


def _losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    return [r["ce"] for r in rows if r["kind"] == "train"]


def test_two_sharded_processes_resume_after_a_kill_and_equal_one_process(tmp_path, make_wav):
    rows = [{"id": f"u{i}", "audio": make_wav(f"c{i}.wav", seconds=1.0 + 0.4 * i, seed=i).name, "text_de": t}
            for i, t in enumerate(TARGETS)]
    data = tmp_path / "four.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    common = ["mode=full", "model.path=builtin:tiny-random", f"data.dataset={data}", "train.epochs=2", "train.lr=1e-3", "train.scheduler=cosine",
              "train.log_every=1", "train.save_every=1", "train.check_segments=1", "model.device=cpu"]
    torchrun = ["-m", "torch.distributed.run", "--nproc_per_node", "2", str(script), "train.batch_size=1", "train.fsdp=true"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def launch(args: list[str], name: str, stop: int = 0) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *args, *common, f"output={tmp_path / name}"], capture_output=True,
                              text=True, env={**env, "STOP_AT": str(stop)})

    one = launch([str(script), "train.batch_size=2"], "one")
    assert one.returncode == 0, one.stderr[-3000:]
    killed = launch(torchrun, "sharded", stop=3)
    assert killed.returncode != 0 and not (tmp_path / "sharded").exists()
    saved = tmp_path / "sharded.checkpoints" / "last"
    assert any(p.name.startswith("pytorch_model_fsdp") for p in saved.iterdir()), sorted(p.name for p in saved.iterdir())
    resumed = launch(torchrun, "sharded")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    m = read_manifest(tmp_path / "sharded")
    assert m["training"]["resumed_from_steps"] == [3] and m["training"]["steps"] == 4
    assert m["reload_check"]["identical"]
    assert _losses(tmp_path / "sharded") == pytest.approx(_losses(tmp_path / "one"), rel=1e-4)
    a = transformers.Qwen2AudioForConditionalGeneration.from_pretrained(str(tmp_path / "one" / "model")).state_dict()
    b = transformers.Qwen2AudioForConditionalGeneration.from_pretrained(str(tmp_path / "sharded" / "model")).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-4, rtol=1e-4)  # as the DDP test: Adam amplifies reduction-order noise


def test_what_fsdp_does_not_do_is_refused_before_loading(tmp_path, monkeypatch):
    def cfg(**over):
        base = {"output": str(tmp_path / "o"), "model.path": "builtin:tiny-random", "data.dataset": str(tmp_path / "missing.jsonl"), "train.fsdp": "true"}
        return load_config(FinetuneConfig, None, {**base, **over})

    with pytest.raises(ConfigError, match="mode: lora under FSDP is not supported; launch without the FSDP config"):
        finetune.run(cfg(mode="lora"), progress=False)
    with pytest.raises(ConfigError, match="dev.chrf_segments: greedy decoding needs unsharded weights"):
        finetune.run(cfg(**{"dev.chrf_segments": "4"}), progress=False)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch --config_file fsdp.yaml` sets
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ConfigError, match="fsdp_version: stcompress shards with FSDP2"):
        finetune.run(cfg(**{"train.fsdp": "false"}), progress=False)
