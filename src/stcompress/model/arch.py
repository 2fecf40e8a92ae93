"""The one place that knows where Qwen2-Audio keeps its parts.

transformers 4.5x:  model.audio_tower, model.multi_modal_projector,
                    model.language_model (Qwen2ForCausalLM) -> .model.layers, .lm_head
transformers 5.x:   model.model.audio_tower, model.model.multi_modal_projector,
                    model.model.language_model (Qwen2Model) -> .layers;  model.lm_head
Everything else in stcompress asks these functions for "the decoder layers", "the audio tower",
"the LM head" and never walks the module tree itself.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from stcompress.errors import ModelError


def _core(model: nn.Module) -> nn.Module:
    """The module that owns audio_tower / multi_modal_projector / language_model."""
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "audio_tower"):
        return inner  # 5.x
    if hasattr(model, "audio_tower"):
        return model  # 4.5x
    raise ModelError(
        f"model: {type(model).__name__} is not a Qwen2-Audio model (no audio tower found); "
        "load a Qwen2AudioForConditionalGeneration checkpoint"
    )


def layout(model: nn.Module) -> str:
    """'5.x' or '4.x': which transformers module layout this instance uses."""
    return "5.x" if _core(model) is not model else "4.x"


def text_model(model: nn.Module) -> nn.Module:
    """The Qwen2 decoder stack (embed_tokens, layers, norm, rotary_emb), without the LM head."""
    lm = _core(model).language_model
    return lm.model if hasattr(lm, "lm_head") else lm


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return text_model(model).layers


def audio_tower(model: nn.Module) -> nn.Module:
    return _core(model).audio_tower


def projector(model: nn.Module) -> nn.Module:
    return _core(model).multi_modal_projector


def embed_tokens(model: nn.Module) -> nn.Embedding:
    return text_model(model).embed_tokens


def lm_head(model: nn.Module) -> nn.Linear:
    lm = _core(model).language_model
    head = getattr(lm, "lm_head", None)  # 4.5x: on the causal LM
    return head if head is not None else model.lm_head


def vocab_size(model: nn.Module) -> int:
    """Rows of the token embedding (the ids the model can read and, through the LM head, emit)."""
    return embed_tokens(model).weight.shape[0]


def tied_head(model: nn.Module) -> bool:
    """The LM head shares the embedding's weight (Gemma 3; Qwen2-Audio-7B is untied)."""
    return lm_head(model).weight is embed_tokens(model).weight


_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


def slice_vocab(model: nn.Module, old_ids: Sequence[int]) -> dict[int, int]:
    """Keep only the rows `old_ids` of the token embedding and LM head, in place: new id i is old
    id old_ids[i]. The LM head then scores kept tokens only, so decoding cannot emit another id.

    The configs' vocab_size, audio token index, bos/eos/pad ids and the generation config's ids
    move to the new ids (an id outside the kept set is an error, naming the key). A tied head stays
    tied. Returns old id -> new id.
    """
    emb, head = embed_tokens(model), lm_head(model)
    old_size, tied = vocab_size(model), tied_head(model)
    new_id = {old: new for new, old in enumerate(old_ids)}
    if len(new_id) != len(old_ids) or not old_ids or min(old_ids) < 0 or max(old_ids) >= old_size:
        raise ModelError(f"trim_vocab: kept ids must be distinct and in 0..{old_size - 1}")
    config = model.config
    targets = [(config, "audio_token_index"), *((text_config(config), k) for k in _ID_KEYS),
               *((config, k) for k in _ID_KEYS), *((model.generation_config, k) for k in _ID_KEYS)]
    remapped = [(obj, key, _remap_id(getattr(obj, key, None), new_id, key)) for obj, key in targets]
    index = torch.tensor(list(old_ids), dtype=torch.long)
    with torch.no_grad():
        emb.weight = nn.Parameter(emb.weight.detach()[index.to(emb.weight.device)].clone(), requires_grad=emb.weight.requires_grad)
        emb.num_embeddings = len(old_ids)
        if emb.padding_idx is not None:
            emb.padding_idx = new_id.get(emb.padding_idx)
        if tied:
            head.weight = emb.weight
        else:
            head.weight = nn.Parameter(head.weight.detach()[index.to(head.weight.device)].clone(),
                                       requires_grad=head.weight.requires_grad)
        if getattr(head, "bias", None) is not None:
            head.bias = nn.Parameter(head.bias.detach()[index.to(head.bias.device)].clone())
        head.out_features = len(old_ids)
    for obj, key, value in remapped:
        if getattr(obj, key, None) is not None:
            setattr(obj, key, value)
    text_config(config).vocab_size = len(old_ids)
    for module in (model, *model.modules()):
        if getattr(module, "vocab_size", None) == old_size:
            module.vocab_size = len(old_ids)
        if isinstance(getattr(module, "pad_token_id", None), int) and module.pad_token_id >= 0 and module is not emb:
            module.pad_token_id = new_id.get(module.pad_token_id, -1)
    return new_id


def _remap_id(value: Any, new_id: dict[int, int], key: str) -> Any:
    if value is None or (isinstance(value, int) and value < 0):
        return value
    ids = value if isinstance(value, (list, tuple)) else [value]
    missing = [i for i in ids if i not in new_id]
    if missing:
        raise ModelError(f"trim_vocab: {key} {missing[0]} is not among the kept tokens; keep it (it is a special token id)")
    out = [new_id[i] for i in ids]
    return out if isinstance(value, (list, tuple)) else out[0]


def text_config(model_or_config: Any) -> Any:
    config = getattr(model_or_config, "config", model_or_config)
    return config.text_config


def audio_token_id(model_or_config: Any) -> int:
    config = getattr(model_or_config, "config", model_or_config)
    return int(config.audio_token_id)


def num_decoder_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))


def mask_positions(mask: torch.Tensor) -> torch.Tensor:
    """Rotary positions of a left-padded batch: real tokens count from 0, padding sits at 0."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def run_decoder(model: nn.Module, embeds: torch.Tensor, mask: torch.Tensor, **kwargs: Any) -> Any:
    """The decoder stack (no LM head) on left-padded input embeddings."""
    return text_model(model)(inputs_embeds=embeds, attention_mask=mask, position_ids=mask_positions(mask), **kwargs)


# Mel frames kept past the longest clip (even: whole conv2 / pooling windows). With them the last
# content frames' convolutions see padding exactly as in the full 30 s window.
_TRIM_MARGIN = 8


def _run_encoder_layer(layer: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """One audio-encoder layer; 4.5x requires `layer_head_mask` and returns a tuple, 5.x neither.
    Both are GradientCheckpointingLayers, so gradient checkpointing still applies when enabled."""
    if "layer_head_mask" in inspect.signature(layer.forward).parameters:
        out = layer(x, mask, layer_head_mask=None)
    else:
        out = layer(x, mask)
    return out[0] if isinstance(out, tuple) else out


def tower_frames(n_frames: int, bucket: int = 1) -> int:
    """Mel frames `tower_states` needs for a clip of `n_frames` (its margin included), rounded up to
    a multiple of `bucket` and capped at the 30 s window."""
    return min(3000, -(-(n_frames + _TRIM_MARGIN) // bucket) * bucket)


def tower_states(model: nn.Module, input_features: torch.Tensor, feature_attention_mask: torch.Tensor,
                 frames: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Audio-tower output (before the projector): (B, max tokens, d_audio) and tokens per clip.

    transformers' encoder runs all 1500 positions of the 30 s window (its forward refuses shorter
    input) and masks padding out of attention, so content positions depend on content frames only.
    This replays the same layers (conv1, conv2, positions, dropout, encoder layers, avg-pool, norm)
    on the frames that exist plus a small margin: identical outputs (max difference 1e-6 on 4.57
    and 5.x, checked by tests against the model's own forward), 5-10x less work for short clips.
    Gradients flow when enabled; layerdrop (0 in Qwen2-Audio) is not replayed. `frames`: run
    exactly that many frames (at least `tower_frames` of the longest clip), so that the shapes the
    kernels see do not depend on which clips share the batch.
    """
    tower = audio_tower(model)
    device, dtype = tower.conv1.weight.device, tower.conv1.weight.dtype
    lengths = feature_attention_mask.to(device).sum(-1)
    conv_lengths, out_lengths = tower._get_feat_extract_output_lengths(lengths)
    need = min(int(lengths.max()) + _TRIM_MARGIN, input_features.shape[-1])
    if frames is not None and frames < need:
        raise ValueError(f"tower_states: frames={frames} cuts into the longest clip; it needs {need}")
    frames = need if frames is None else min(frames, input_features.shape[-1])
    x = input_features[..., :frames].to(device=device, dtype=dtype)
    x = nn.functional.gelu(tower.conv1(x))
    x = nn.functional.gelu(tower.conv2(x)).permute(0, 2, 1)
    x = x + tower.embed_positions.weight[: x.shape[1]]
    x = nn.functional.dropout(x, p=float(getattr(tower, "dropout", 0.0)), training=tower.training)
    padded = torch.arange(x.shape[1], device=device)[None, :] >= conv_lengths[:, None]
    # Additive bidirectional mask over the conv outputs: padding frames are never attended to.
    attn = torch.zeros(x.shape[0], 1, x.shape[1], x.shape[1], dtype=dtype, device=device)
    attn.masked_fill_(padded[:, None, None, :], torch.finfo(dtype).min)
    for layer in tower.layers:
        x = _run_encoder_layer(layer, x, attn)
    x = tower.layer_norm(tower.avg_pooler(x.permute(0, 2, 1)).permute(0, 2, 1))
    return x, out_lengths


def project_audio(model: nn.Module, states: torch.Tensor) -> torch.Tensor:
    """The projector on audio-tower output (any leading shape): on the projector's device, in the
    tower's dtype, as the model's own forward feeds it."""
    proj = projector(model)
    return proj(states.to(device=next(proj.parameters()).device, dtype=audio_tower(model).conv1.weight.dtype))


# ---------------------------------------------------------------------------------------------
# Parameter names -> components (sizes per component, 4-bit skip lists)

COMPONENTS = ("audio_tower", "projector", "embed_tokens", "decoder_layers", "lm_head", "other")
# Components made of nn.Linear layers, which bitsandbytes can store in 4 bits (embed_tokens cannot).
QUANTIZABLE_COMPONENTS = ("audio_tower", "projector", "lm_head")

# Both layouts, and the 4.5x names that both versions write to disk (5.x converts on save).
# Matched anywhere in the name: transformers versions prefix the same module differently on disk
# (language_model.model.*, model.language_model.*, ...), so only the module's own name counts.
_COMPONENT_PATTERNS = (
    ("audio_tower", re.compile(r"(?:^|\.)audio_tower\.")),
    ("projector", re.compile(r"(?:^|\.)multi_modal_projector\.")),
    ("embed_tokens", re.compile(r"(?:^|\.)embed_tokens\.")),
    ("decoder_layers", re.compile(r"(?:^|\.)layers\.\d+\.")),
    ("lm_head", re.compile(r"(?:^|\.)lm_head\.")),
)
_PEFT_PREFIX = "base_model.model."

# Module-name patterns that transformers' bitsandbytes integration leaves unquantized. 4.5x matches
# a child name or "<key>." anywhere in the module path; 5.x matches from the start of the path or as
# a suffix. Listing each component under both layouts' names keeps a saved 4-bit config portable.
_SKIP_PATTERNS = {
    "audio_tower": ("audio_tower", "model.audio_tower"),
    "projector": ("multi_modal_projector", "model.multi_modal_projector"),
    "lm_head": ("lm_head",),
}


def meta_model(config: Any, vocab_size: int | None = None) -> nn.Module:
    """Qwen2-Audio built from `config` on the meta device (shapes only: the 7B costs nothing);
    `vocab_size`: the embedding and LM head rows instead of the config's (a trimmed vocabulary)."""
    import copy

    import transformers

    if vocab_size is not None:
        config = copy.deepcopy(config)
        text_config(config).vocab_size = vocab_size
    with torch.device("meta"):
        return transformers.Qwen2AudioForConditionalGeneration._from_config(config)


def linear_shapes(model: nn.Module) -> list[tuple[str, str, int, int]]:
    """(name, component, out_features, in_features) of every nn.Linear."""
    return [(name, component_of(name + ".weight"), m.out_features, m.in_features)
            for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def component_of(param_name: str) -> str:
    """Which part of Qwen2-Audio a parameter (or 4-bit quant-state tensor) belongs to.

    Knows the 4.5x and 5.x module paths, the names both write to disk, and peft's
    `base_model.model.` prefix; anything else (final norm, rotary buffers) is "other".
    """
    name = param_name.removeprefix(_PEFT_PREFIX)
    for component, pattern in _COMPONENT_PATTERNS:
        if pattern.search(name):
            return component
    return "other"


def quantization_skip_patterns(components: Sequence[str]) -> list[str]:
    """`llm_int8_skip_modules` entries that keep `components` out of 4-bit in both layouts."""
    unknown = [c for c in components if c not in _SKIP_PATTERNS]
    if unknown:
        raise ModelError(
            f"keep_unquantized: {unknown[0]!r} cannot be quantized or kept; use any of {', '.join(QUANTIZABLE_COMPONENTS)}"
        )
    return [p for c in components for p in _SKIP_PATTERNS[c]]


# 4.5x module path -> 5.x module path (transformers 5 converts the same way when loading weights).
_TO_5X = (
    (re.compile(r"^audio_tower\."), "model.audio_tower."),
    (re.compile(r"^multi_modal_projector\."), "model.multi_modal_projector."),
    (re.compile(r"^language_model\.model\."), "model.language_model."),
    (re.compile(r"^language_model\.lm_head\."), "lm_head."),
)
_TO_4X = (
    (re.compile(r"^model\.audio_tower\."), "audio_tower."),
    (re.compile(r"^model\.multi_modal_projector\."), "multi_modal_projector."),
    (re.compile(r"^model\.language_model\."), "language_model.model."),
    (re.compile(r"^lm_head\."), "language_model.lm_head."),
)


def rename_for_layout(param_name: str, target_layout: str) -> str:
    """A parameter name from either layout (peft's `base_model.model.` prefix allowed) in the
    `target_layout` ('5.x' or '4.x') module paths, e.g. to apply a LoRA adapter saved by the other
    transformers family."""
    prefix = _PEFT_PREFIX if param_name.startswith(_PEFT_PREFIX) else ""
    name = param_name[len(prefix):]
    for pattern, replacement in _TO_5X if target_layout == "5.x" else _TO_4X:
        if pattern.match(name):
            return prefix + pattern.sub(replacement, name, count=1)
    return param_name
