"""Which weights train: LoRA / QLoRA adapters (peft) or the full model, and how many that is.

The paper's QLoRA: NF4 base, LoRA r 64 / alpha 128 / rsLoRA / dropout 0 on every linear layer,
audio encoder included, LM head excluded: 2.41% of the weights train. Targets are resolved here
to explicit module names (the audio tower located through `model.arch`, never by path), so a
misspelled target fails before training instead of silently adapting nothing.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from stcompress.config import LoraOptions
from stcompress.errors import ConfigError, ModelError
from stcompress.metrics.efficiency import count_parameters
from stcompress.model import arch

log = logging.getLogger(__name__)

ALL_LINEAR = "all-linear"


def _prefix_of(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def linear_layers(model: nn.Module) -> dict[str, str]:
    """Qualified name -> part ("audio", "projector", "decoder") of every linear layer but the LM head.

    bitsandbytes' 4-bit layers subclass nn.Linear, so QLoRA models list the same layers.
    """
    head = arch.lm_head(model)
    tower = _prefix_of(model, arch.audio_tower(model)) + "."
    proj = _prefix_of(model, arch.projector(model)) + "."
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module is not head:
            out[name] = "audio" if name.startswith(tower) else "projector" if name.startswith(proj) else "decoder"
    return out


def resolve_targets(model: nn.Module, targets: tuple[str, ...], *, audio_tower: bool) -> list[str]:
    """Qualified names of the linear layers `targets` selects ("all-linear" or leaf names)."""
    layers = linear_layers(model)
    leaves = sorted({name.rsplit(".", 1)[-1] for name in layers})
    if not targets:
        raise ConfigError(["lora.targets: empty; use all-linear or module names such as q_proj,v_proj"])
    unknown = [t for t in targets if t != ALL_LINEAR and not any(n == t or n.endswith("." + t) for n in layers)]
    if unknown:
        head = " (the LM head is never adapted)" if "lm_head" in unknown else ""
        raise ConfigError([f"lora.targets: {unknown[0]!r} matches no linear layer of the model{head}; "
                           f"use all-linear or some of {', '.join(leaves)}"])
    chosen = [
        name for name in layers
        if ALL_LINEAR in targets or any(name == t or name.endswith("." + t) for t in targets)
    ]
    if not audio_tower:
        chosen = [name for name in chosen if layers[name] != "audio"]
    if not chosen:
        raise ConfigError(["lora.targets: with the audio tower excluded nothing is left to adapt; add decoder targets"])
    return chosen


def apply_lora(model: nn.Module, opts: LoraOptions, *, quantized: bool, audio_tower: bool,
               gradient_checkpointing: bool) -> tuple[nn.Module, dict[str, Any]]:
    """A peft model with LoRA adapters on the chosen layers, and a record of what was done."""
    import peft

    targets = resolve_targets(model, opts.targets, audio_tower=audio_tower)
    parts = linear_layers(model)
    to_save: list[str] = []
    if opts.train_projector:  # its own weights train (modules_to_save); no LoRA on top of them
        targets = [name for name in targets if parts[name] != "projector"]
        to_save = [_prefix_of(model, arch.projector(model)).rsplit(".", 1)[-1]]
        if not targets:
            raise ConfigError(["lora.targets: with the projector trained in full nothing is left to adapt; add decoder targets"])
    info: dict[str, Any] = {
        "r": opts.r, "alpha": opts.alpha, "rslora": opts.rslora, "dropout": opts.dropout,
        "targets": list(opts.targets), "audio_tower": audio_tower,
        "adapted_layers": {p: sum(parts[n] == p for n in targets) for p in ("audio", "projector", "decoder")},
        "leaf_names": sorted({n.rsplit(".", 1)[-1] for n in targets}),
        "trained_in_full": to_save,
    }
    if quantized and opts.prepare_kbit:
        upcast = [p for p in model.parameters() if p.dtype in (torch.float16, torch.bfloat16)
                  and type(p).__name__ != "Params4bit"]
        model = peft.prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
        info["prepare_kbit"] = {
            "applied": True, "upcast_to_fp32_parameters": sum(p.numel() for p in upcast),
            "note": "in memory for training only; the adapter holds LoRA weights, the base stays as it was on disk",
        }
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    config = peft.LoraConfig(
        r=opts.r, lora_alpha=opts.alpha, lora_dropout=opts.dropout, use_rslora=opts.rslora,
        target_modules=targets, bias="none", modules_to_save=to_save or None,
    )
    return peft.get_peft_model(model, config), info


def setup_full(model: nn.Module, *, freeze_audio_tower: bool, gradient_checkpointing: bool,
               freeze_language_model: bool = False) -> nn.Module:
    """Every weight trains, except the audio tower's and the language model's when frozen."""
    for p in model.parameters():
        p.requires_grad_(True)
    frozen = ([arch.audio_tower(model)] if freeze_audio_tower else []) + \
        ([arch.text_model(model), arch.lm_head(model)] if freeze_language_model else [])
    for part in frozen:
        for p in part.parameters():
            p.requires_grad_(False)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def trainable_report(model: nn.Module) -> dict[str, Any]:
    """Trainable and total weights (true counts, 4-bit layers included) and the trainable share."""
    trainable = count_parameters(model, trainable_only=True)
    total = count_parameters(model)
    if trainable == 0:
        raise ModelError("model: no trainable weights; check lora.targets and train.freeze_audio_tower")
    return {"trainable_parameters": trainable, "total_parameters": total,
            "trainable_percent": round(100.0 * trainable / total, 4)}
