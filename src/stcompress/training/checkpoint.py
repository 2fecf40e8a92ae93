"""Checkpoints that survive a kill: weights, optimizer, scheduler, RNG states and the data position.

Layout of the checkpoint directory (default `<output>.checkpoints`, beside the stage output):

    last/   accelerate's save_state (trainable weights only, optimizer, scheduler, RNG states)
            + trainer_state.json (step, epoch, micro-batches done in that epoch, best so far, history)
    best/   model.safetensors with the trainable weights of the best dev evaluation + best.json

Each is written under a temporary name and renamed into place, so a kill while saving leaves the
previous checkpoint intact. accelerate does the model/optimizer part so sharded FSDP / DeepSpeed
states are saved its way; the hooks below keep only trainable weights in the non-sharded case
(a QLoRA checkpoint is the adapter and its optimizer state, not another copy of the 4-bit base).
A resumed run must have the same training config (compared key by key) as the one it continues,
and the same inputs: the content of the model, data and teacher (`TrainerState.inputs`), so other
weights at the same path (an upstream stage reran) are refused. Both directories end with
`checksums.json` (sha256 of every file, written last, inside the temporary directory), verified
before anything is read back: a changed or damaged file is refused by name, never trained on.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stcompress.artifacts import atomic_write_json, fault_point, reading, sha256_file
from stcompress.errors import StcompressError

log = logging.getLogger(__name__)

LAST, BEST = "last", "best"
STATE_FILE = "trainer_state.json"
BEST_WEIGHTS = "model.safetensors"
CHECKSUMS = "checksums.json"
# Config keys that may change between a run and its resumption (they do not change the training).
_RESUME_FREE = ("output", "train.checkpoint_dir", "train.resume", "train.keep_checkpoints", "train.log_every",
                "train.num_workers", "train.check_segments")
_CORRUPT = "a kill or a full disk damaged the checkpoint; set train.resume: never to start over (or delete the checkpoint)"


@dataclass
class TrainerState:
    """Where training stands; everything the loop needs to continue exactly where it stopped."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch (0-based)
    batch_in_epoch: int = 0  # micro-batches of `epoch` already consumed by this process
    best: dict[str, Any] | None = None  # {"step", "epoch", "metric", "value"} of the best evaluation
    bad_evals: int = 0  # evaluations since the last improvement (early stopping)
    stopped_early: bool = False
    finished: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)
    window: dict[str, float] = field(default_factory=dict)  # loss sums since the last history row
    epoch_sums: dict[str, float] = field(default_factory=dict)  # loss sums of the current epoch
    last_epoch_loss: float | None = None  # token-mean CE of the last completed epoch
    train_seconds: float = 0.0
    tokens: int = 0  # non-pad input tokens trained on
    target_tokens: int = 0
    resumed_from: list[int] = field(default_factory=list)  # steps this run was resumed at
    config: dict[str, Any] = field(default_factory=dict)  # flattened training config
    inputs: dict[str, Any] = field(default_factory=dict)  # content identities of model, data, teacher

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainerState:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def resume_config(config: dict[str, Any]) -> dict[str, Any]:
    """The flattened config keys a resumed run must share with the run it continues."""
    return {k: v for k, v in flatten(json.loads(json.dumps(config, default=str))).items() if k not in _RESUME_FREE}


def _trainable_names(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def install_hooks(accelerator: Any) -> None:
    """Make accelerate's save_state / load_state store and restore trainable weights only."""

    from stcompress.training.fsdp import sharded

    if sharded(accelerator):  # FSDP: accelerate's sharded save of every weight (torch.distributed.checkpoint)
        return

    def save_hook(models: list[nn.Module], weights: list[dict[str, torch.Tensor]], output_dir: str) -> None:
        for model, state in zip(models, weights):
            keep = _trainable_names(model)
            for key in [k for k in state if k not in keep]:
                del state[key]

    def load_hook(models: list[nn.Module], input_dir: str) -> None:
        from safetensors.torch import load_file

        for i, model in enumerate(list(models)):
            path = Path(input_dir) / ("model.safetensors" if i == 0 else f"model_{i}.safetensors")
            load_trainable(model, load_file(str(path)), where=str(path))
            models.remove(model)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def load_trainable(model: nn.Module, state: dict[str, torch.Tensor], *, where: str) -> None:
    """Load trainable weights; every trainable parameter must be in `state` and nothing else."""
    expected = _trainable_names(model)
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        first = sorted(missing or unexpected)[0]
        raise StcompressError(f"{where}: checkpoint does not match the model being trained ({len(missing)} missing, "
                              f"{len(unexpected)} unexpected weights, e.g. {first}); pass --train.resume never to start over")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor.to(device=params[name].device, dtype=params[name].dtype))


def _replace_dir(tmp: Path, final: Path) -> None:
    old = final.with_name(final.name + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        fault_point(f"between renames {final.name}")
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(accelerator: Any, ckpt_dir: Path, state: TrainerState) -> None:
    tmp = ckpt_dir / f".{LAST}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_json(tmp / STATE_FILE, state.to_json())
        write_checksums(tmp)
        _replace_dir(tmp, ckpt_dir / LAST)
    accelerator.wait_for_everyone()
    log.debug("checkpoint at step %d -> %s", state.step, ckpt_dir / LAST)


def _recover(final: Path) -> None:
    """A kill between `_replace_dir`'s two renames leaves only `<final>.old`: the previous complete
    checkpoint. Put it back, rather than silently training from step 0."""
    old = final.with_name(final.name + ".old")
    if not final.exists() and (old / STATE_FILE).is_file():
        os.replace(old, final)
        log.warning("checkpoint: %s was mid-replacement when the run stopped; using the previous one", final)


def read_state(ckpt_dir: Path) -> TrainerState | None:
    _recover(ckpt_dir / LAST)
    path = ckpt_dir / LAST / STATE_FILE
    if not (ckpt_dir / LAST).is_dir():
        return None
    verify_checksums(ckpt_dir / LAST)
    with reading(path, _CORRUPT):
        return TrainerState.from_json(json.loads(path.read_text(encoding="utf-8")))


def write_checksums(directory: Path) -> None:
    """sha256 of every file of a checkpoint directory, written last (full hashes: a flipped bit
    anywhere in the weights or the optimizer state must show)."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != CHECKSUMS)
    atomic_write_json(directory / CHECKSUMS, {str(p.relative_to(directory)): sha256_file(p) for p in files})


def verify_checksums(directory: Path) -> None:
    fix = "restore it, or set train.resume: never to start over (that discards the checkpoints)"
    listing = directory / CHECKSUMS
    try:
        expected = json.loads(listing.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        raise StcompressError(f"checkpoint: {listing} is missing or corrupt, so {directory} cannot be trusted; {fix}") from None
    for name, digest in expected.items():
        path = directory / name
        if not path.is_file() or sha256_file(path) != digest:
            raise StcompressError(f"checkpoint: {path} is missing or does not match its checksum (changed or damaged "
                                  f"since it was saved); {fix}")


def check_inputs(saved: TrainerState, inputs: dict[str, Any], ckpt_dir: Path) -> None:
    """A checkpoint trained on other content (model, data, teacher) must not be continued."""
    changed = sorted(k for k in set(saved.inputs) | set(inputs) if saved.inputs.get(k) != inputs.get(k))
    if changed:
        raise StcompressError(f"train.resume: the checkpoint in {ckpt_dir} was trained on other inputs (the content of "
                              f"{', '.join(changed)} changed since); use a new output, or set train.resume: never to start over")


def check_resumable(saved: TrainerState, config: dict[str, Any], ckpt_dir: Path) -> None:
    """A checkpoint from a different training config must not be continued silently."""
    changed = sorted(k for k in set(saved.config) | set(config) if saved.config.get(k) != config.get(k))
    if changed:
        shown = ", ".join(f"{k} ({saved.config.get(k)!r} -> {config.get(k)!r})" for k in changed[:4])
        raise StcompressError(f"train.resume: the checkpoint in {ckpt_dir} was made with a different config: {shown}; "
                              "restore those settings, or pass --train.resume never to start over")


def load_checkpoint(accelerator: Any, ckpt_dir: Path) -> None:
    with reading(ckpt_dir / LAST, _CORRUPT):  # optimizer.bin, model.safetensors, scheduler, RNG states
        accelerator.load_state(str(ckpt_dir / LAST))


def save_best(accelerator: Any, model: nn.Module, ckpt_dir: Path, record: dict[str, Any]) -> None:
    """The trainable weights of the best evaluation so far (gathered from shards when sharded)."""
    from safetensors.torch import save_file

    state = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        keep = _trainable_names(accelerator.unwrap_model(model))
        tensors = {k: v.detach().cpu().contiguous() for k, v in state.items() if k in keep}
        tmp = ckpt_dir / f".{BEST}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(tensors, str(tmp / BEST_WEIGHTS))
        atomic_write_json(tmp / "best.json", record)
        write_checksums(tmp)
        _replace_dir(tmp, ckpt_dir / BEST)
    accelerator.wait_for_everyone()


def load_best(model: nn.Module, ckpt_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    best = ckpt_dir / BEST
    verify_checksums(best)
    with reading(best, _CORRUPT):
        load_trainable(model, load_file(str(best / BEST_WEIGHTS)), where=str(best))
        return json.loads((best / "best.json").read_text(encoding="utf-8"))
