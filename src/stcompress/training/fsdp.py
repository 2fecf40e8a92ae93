"""Sharded full fine-tuning with accelerate's FSDP2 (torch `fully_shard`): what stcompress adds.

accelerate does the sharding, sharded checkpoints (torch.distributed.checkpoint) and the gather of
a full state dict; this module decides when FSDP is on, which layers become FSDP units (every
decoder and audio-encoder layer, found through `model.arch`), and turns FSDP on for CPU processes
too: accelerate enables it for accelerators only, while FSDP2 itself runs on gloo (the CPU tests).

Launch with the shipped config (`accelerate launch --config_file recipes/accelerate/fsdp.yaml -m
stcompress finetune ...`, which sets ACCELERATE_USE_FSDP and the FSDP_* variables) or, through
torchrun, with `train.fsdp: true`. LoRA / QLoRA are refused: their weights are small, so DDP (the
same launch without the FSDP config) already fits whatever fits the base, and peft + bitsandbytes
4-bit storage under FSDP is not something this project tests.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from stcompress.config import FinetuneConfig
from stcompress.errors import ConfigError
from stcompress.model import arch


def requested(cfg: FinetuneConfig) -> bool:
    """train.fsdp, or an accelerate launch config with distributed_type FSDP."""
    return cfg.train.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def check(cfg: FinetuneConfig) -> None:
    """Refuse what the sharded path does not do, before anything is loaded."""
    if not requested(cfg):
        return
    problems = []
    if cfg.mode != "full":
        problems.append(f"mode: {cfg.mode} under FSDP is not supported; launch without the FSDP config (accelerate "
                        "launch or torchrun then gives DDP, one copy of the base per GPU), or use mode: full")
    if os.environ.get("FSDP_VERSION", "2") != "2":
        problems.append("fsdp_version: stcompress shards with FSDP2; set fsdp_version: 2 in the accelerate config")
    if cfg.dev.chrf_segments:
        problems.append("dev.chrf_segments: greedy decoding needs unsharded weights; under FSDP use dev.chrf_segments: 0 "
                        "(dev loss is computed sharded) and score the output with `stcompress evaluate`")
    if cfg.kd.ratio > 0:
        problems.append("kd.ratio: word-level KD is not supported under FSDP (the teacher is not sharded); use kd.ratio: 0")
    if cfg.train.optimizer != "adamw" and cfg.train.optimizer != "adafactor":
        problems.append(f"train.optimizer: {cfg.train.optimizer} (bitsandbytes) is untested on sharded DTensor weights; "
                        "under FSDP use adamw (its states are sharded too) or adafactor")
    if problems:
        raise ConfigError(problems)


def plugin(cfg: FinetuneConfig) -> Any:
    """accelerate's FSDP plugin: FSDP2, sharded checkpoints; the FSDP_* variables of a launch config win."""
    if not requested(cfg):
        return None
    from accelerate import FullyShardedDataParallelPlugin

    env = os.environ.get
    return FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy=env("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP"),
        state_dict_type=env("FSDP_STATE_DICT_TYPE", "SHARDED_STATE_DICT"),
        reshard_after_forward=env("FSDP_RESHARD_AFTER_FORWARD", "true").lower() == "true",
        cpu_ram_efficient_loading=False,  # stcompress loads the model itself, then accelerate shards it
    )


def enable_on_cpu(accelerator: Any, fsdp_plugin: Any) -> None:
    """accelerate leaves multi-process CPU runs as DDP even when FSDP is asked for; FSDP2 works on
    gloo, so switch the shared state to FSDP (the plugin then drives `prepare` as on GPUs)."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    if fsdp_plugin is not None and accelerator.distributed_type == DistributedType.MULTI_CPU:
        # Both shared states: every AcceleratorState() copies PartialState's fields over its own.
        PartialState().distributed_type = DistributedType.FSDP
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = fsdp_plugin


def sharded(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def set_units(accelerator: Any, model: nn.Module) -> None:
    """Each decoder layer and each audio-encoder layer is its own FSDP unit (gathered one at a time)."""
    names = sorted({type(arch.decoder_layers(model)[0]).__name__, type(arch.audio_tower(model).layers[0]).__name__})
    accelerator.state.fsdp_plugin.transformer_cls_names_to_wrap = names


def full_state_dict(accelerator: Any, model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on CPU (every process must call it; rank 0 gets the tensors),
    keyed as in the transformers model (TranslationLM's `model.` prefix removed)."""
    state = accelerator.get_state_dict(model)
    return {k.removeprefix("model."): v for k, v in state.items()}
