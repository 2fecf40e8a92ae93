"""Peak GPU memory of a fine-tuning run, per GPU, from the model config and the training options.

`stcompress finetune ... --dry-run` prints it. The parts:

- weights, gradients, optimizer states: exact parameter counts (the model built on the meta
  device) x bytes per element, divided by the FSDP world size when sharded;
- bf16 weight copies: with fp32 weights under bf16 autocast, autocast keeps a bf16 copy of every
  trainable matrix for the whole forward and backward (2 bytes a weight);
- activations: saved-for-backward elements per token and layer, measured on CPU with
  torch.autograd.graph.saved_tensors_hooks (a Qwen2 decoder layer with SDPA keeps 10 h + 4 i +
  heads + 2 elements a token, an audio-encoder layer 9 d + 2 f + heads + 4; tests/test_memory.py
  re-measures them); gradient checkpointing keeps one hidden state per layer plus one layer's full set;
- logits: the N target positions x vocabulary in bf16, fp32 and the fp32 gradient (10 bytes an
  element), or one chunk of them with train.loss_chunk.

It is a sum of what can be alive at once at the start of the backward pass (the gradients taken as
complete), so it errs high; allocator caching ("reserved") adds typically 5-10% on top.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

GB = 1e9
# Optimizer state bytes per trainable weight, for weights of `b` bytes (torch keeps states in the weight dtype).
_STATE_BYTES = {
    "adamw": lambda b: 2 * b,
    "adamw_8bit": lambda b: 2.0,  # two uint8 moments (+ one fp32 absmax per 2048-block, negligible)
    "paged_adamw_8bit": lambda b: 2.0,  # same states, in unified memory that can spill to CPU
    "paged_adamw": lambda b: 8.0,  # fp32 moments, pageable
    "adafactor": None,  # factored: rows + columns per matrix, computed from the shapes
}


@dataclass
class Shape:
    """What the estimate needs to know about one training step."""

    batch: int  # items per GPU per micro-batch
    seconds: float = 30.0  # clip length (Qwen2-Audio: 50 encoder frames, 25 audio tokens a second)
    sequence: int = 1024  # decoder tokens per item (prompt + audio tokens + target)
    targets: int | None = None  # target tokens per item; None: sequence - audio tokens - 30


@dataclass
class Estimate:
    weights: float
    gradients: float
    optimizer: float
    weight_copies: float
    activations: float
    logits: float
    world: int
    note: str

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.weight_copies + self.activations + self.logits

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total": self.total}


def _meta_model(config: Any) -> torch.nn.Module:
    import transformers

    with torch.device("meta"):
        return transformers.Qwen2AudioForConditionalGeneration(config)


def decoder_layer_elements(h: int, i: int, heads: int) -> int:
    return 10 * h + 4 * i + heads + 2


def encoder_layer_elements(d: int, f: int, heads: int) -> int:
    return 9 * d + 2 * f + heads + 4


def estimate(config: Any, shape: Shape, *, master_weights: str = "fp32", autocast: bool = True, optimizer: str = "adamw",
             gradient_checkpointing: bool = False, freeze_audio_tower: bool = False, cache_audio: bool = False,
             loss_chunk: int = 0, world: int = 1, sharded: bool = False) -> Estimate:
    """Bytes per GPU for full fine-tuning of a Qwen2-Audio `config` (a transformers config)."""
    from stcompress.model import arch

    model = _meta_model(config)
    tower = arch.audio_tower(model)
    tower_ids = {id(p) for p in tower.parameters()}
    params = list(model.parameters())
    trainable = [p for p in params if not (freeze_audio_tower and id(p) in tower_ids)]
    wb = 2 if master_weights == "bf16" else 4
    shard = world if sharded else 1
    n_all, n_train = sum(p.numel() for p in params), sum(p.numel() for p in trainable)
    per_weight = _STATE_BYTES[optimizer]
    if per_weight is None:
        state = sum(4 * (p.shape[0] + p.shape[1]) if p.ndim == 2 else 4 * p.numel() for p in trainable)
    else:
        state = per_weight(wb) * n_train
    copies = 0.0
    if autocast and wb == 4 and not sharded:  # FSDP gathers bf16 weights unit by unit instead
        embed = arch.embed_tokens(model).weight.numel()
        copies = 2.0 * sum(p.numel() for p in trainable if p.ndim >= 2) - 2.0 * embed
    act_bytes = 2 if (autocast or wb == 2) else 4
    text = arch.text_config(config)
    audio = config.audio_config
    audio_tokens = int(25 * shape.seconds)
    frames = int(50 * shape.seconds)
    targets = shape.targets if shape.targets is not None else max(shape.sequence - audio_tokens - 30, 1)
    h, layers = text.hidden_size, text.num_hidden_layers
    dec = decoder_layer_elements(h, text.intermediate_size, text.num_attention_heads)
    enc = encoder_layer_elements(audio.d_model, audio.encoder_ffn_dim, audio.encoder_attention_heads)
    if gradient_checkpointing:
        dec_total = shape.sequence * (layers * h + dec)
        enc_total = frames * (audio.encoder_layers * audio.d_model + enc)
    else:
        dec_total = shape.sequence * layers * dec
        enc_total = frames * audio.encoder_layers * enc
    tower_runs_with_grad = not freeze_audio_tower
    activations = shape.batch * act_bytes * (dec_total + 4 * h * shape.sequence + (enc_total if tower_runs_with_grad else 0)
                                             + 2 * audio.d_model * audio_tokens)
    vocab = text.vocab_size
    n_logits = shape.batch * targets
    logits = 10.0 * vocab * (min(loss_chunk, n_logits) if loss_chunk else n_logits)
    units = 0.0
    if sharded:  # two gathered decoder layers (current + prefetched) in bf16
        units = 2 * 2.0 * sum(p.numel() for p in arch.decoder_layers(model)[0].parameters())
    note = ("audio tower not run (cached features)" if cache_audio else
            "audio tower frozen (runs without gradients)" if freeze_audio_tower else "audio tower trains")
    return Estimate(weights=wb * n_all / shard, gradients=wb * n_train / shard, optimizer=state / shard,
                    weight_copies=copies + units, activations=float(activations), logits=logits, world=shard, note=note)


def _config_of(path: str) -> Any:
    import transformers

    from stcompress.model.load import resolve_model_path

    return transformers.AutoConfig.from_pretrained(resolve_model_path(path))


def estimate_for(cfg: Any) -> dict[str, Any]:
    """The estimate for a FinetuneConfig (mode full), at train.batch_size, train.max_length, 30 s clips."""
    import os

    from stcompress.training import fsdp

    t = cfg.train
    if cfg.mode != "full":
        return {"mode": cfg.mode, "note": "the estimate covers mode full (LoRA / QLoRA train a few % of the weights)"}
    from stcompress.stages.finetune import resolve_base

    path, _ = resolve_base(cfg.model.path)
    world = int(os.environ.get("WORLD_SIZE", "0")) or max(torch.cuda.device_count(), 1)
    gpu = cfg.model.device != "cpu"
    autocast = t.mixed_precision in ("bf16", "fp16") or (t.mixed_precision == "auto" and gpu)
    est = estimate(_config_of(path), Shape(batch=t.batch_size, sequence=t.max_length), master_weights=t.master_weights,
                   autocast=autocast, optimizer=t.optimizer, gradient_checkpointing=t.gradient_checkpointing,
                   freeze_audio_tower=t.freeze_audio_tower, cache_audio=t.cache_audio, loss_chunk=t.loss_chunk,
                   world=world, sharded=fsdp.requested(cfg) and world > 1)
    return {"mode": "full", "model": path, "batch_size": t.batch_size, "sequence": t.max_length, "seconds": 30.0,
            **est.to_dict()}


def format_estimate(row: dict[str, Any]) -> str:
    if "total" not in row:
        return f"finetune --dry-run: {row['note']}"
    parts = ("weights", "gradients", "optimizer", "weight_copies", "activations", "logits")
    lines = [f"finetune --dry-run: peak memory per GPU (estimate; {row['world']} process(es)"
             f"{', FSDP-sharded' if row['world'] > 1 else ''}), batch {row['batch_size']}, "
             f"{row['sequence']} tokens, {row['seconds']:.0f} s clips, {row['note']}:"]
    lines += [f"  {name:<14}{row[name] / GB:8.2f} GB" for name in parts]
    lines.append(f"  {'total':<14}{row['total'] / GB:8.2f} GB (allocated; reserved is typically 5-10% more)")
    return "\n".join(lines)
