"""Decoder-layer surgery: temporary views (for the importance search) and permanent removal.

Removing layer i from Qwen2-Audio's LM takes more than deleting a module (PAPER.md, "Known
defects"): each kept layer's `self_attn.layer_idx` indexes the KV cache and must be renumbered,
and the text config's `num_hidden_layers` and per-layer lists (`layer_types`) must shrink with the
layer list, or transformers 5.x fails in generation (IndexError) and on reload.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

from torch import nn

from stcompress.errors import StcompressError
from stcompress.model import arch

# Config attributes holding one entry per decoder layer.
_PER_LAYER_LISTS = ("layer_types",)


def check_layers(indices: Sequence[int], n_layers: int, *, item: str = "layers") -> list[int]:
    """Validate layer indices (0-based) against a decoder of n_layers; sorted, unique."""
    bad = [i for i in indices if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < n_layers]
    if bad:
        raise StcompressError(f"{item}: layer index {bad[0]!r} is out of range; the decoder has layers 0..{n_layers - 1}")
    dupes = sorted({i for i in indices if list(indices).count(i) > 1})
    if dupes:
        raise StcompressError(f"{item}: layer {dupes[0]} is listed twice; list each layer once")
    return sorted(indices)


def _text_configs(model: nn.Module) -> list[Any]:
    """Every config object that describes the decoder (the decoder's own and the top model's)."""
    configs = [arch.text_config(model), arch.text_model(model).config]
    unique: list[Any] = []
    for c in configs:
        if all(c is not u for u in unique):
            unique.append(c)
    return unique


def _apply(model: nn.Module, layers: Sequence[nn.Module], per_layer: dict[str, list[Any]]) -> None:
    """Install `layers` as the decoder stack with consistent indices and config lists."""
    arch.text_model(model).layers = nn.ModuleList(layers)
    for new_index, layer in enumerate(layers):
        layer.self_attn.layer_idx = new_index
    for config in _text_configs(model):
        config.num_hidden_layers = len(layers)
        for name, values in per_layer.items():
            setattr(config, name, list(values))


def _per_layer_values(model: nn.Module) -> dict[str, list[Any]]:
    config = arch.text_config(model)
    return {name: list(getattr(config, name)) for name in _PER_LAYER_LISTS if getattr(config, name, None) is not None}


def _select(values: dict[str, list[Any]], keep: Sequence[int]) -> dict[str, list[Any]]:
    return {name: [vals[i] for i in keep] for name, vals in values.items()}


@contextlib.contextmanager
def decoder_view(model: nn.Module, keep: Sequence[int]) -> Iterator[None]:
    """Run the decoder through `keep` (original indices) only; no weights are copied.

    Everything (layer list, layer indices, config) is restored on exit, also after an error.
    """
    original = list(arch.decoder_layers(model))
    keep = check_layers(list(keep), len(original), item="keep")
    if not keep:
        raise StcompressError("keep: a decoder needs at least one layer; protect or keep at least one")
    indices = [layer.self_attn.layer_idx for layer in original]
    per_layer = _per_layer_values(model)
    _apply(model, [original[i] for i in keep], _select(per_layer, keep))
    try:
        yield
    finally:
        _apply(model, original, per_layer)
        for layer, idx in zip(original, indices):
            layer.self_attn.layer_idx = idx


def remove_decoder_layers(model: nn.Module, remove: Sequence[int]) -> list[int]:
    """Physically drop decoder layers; returns the layer map (new index -> original index)."""
    original = list(arch.decoder_layers(model))
    remove = check_layers(list(remove), len(original), item="remove")
    keep = [i for i in range(len(original)) if i not in set(remove)]
    if not keep:
        raise StcompressError("remove: removing every decoder layer leaves no model; remove fewer layers")
    _apply(model, [original[i] for i in keep], _select(_per_layer_values(model), keep))
    return keep


def remove_encoder_layers(model: nn.Module, remove: Sequence[int]) -> list[int]:
    """Physically drop audio-encoder layers; returns the encoder layer map."""
    tower = arch.audio_tower(model)
    original = list(tower.layers)
    remove = check_layers(list(remove), len(original), item="remove_encoder")
    keep = [i for i in range(len(original)) if i not in set(remove)]
    if not keep:
        raise StcompressError("remove_encoder: removing every audio-encoder layer leaves no encoder; remove fewer")
    tower.layers = nn.ModuleList([original[i] for i in keep])
    for config in {id(c): c for c in (model.config.audio_config, tower.config)}.values():
        config.encoder_layers = len(keep)
    return keep


@contextlib.contextmanager
def encoder_view(model: nn.Module, keep: Sequence[int]) -> Iterator[None]:
    """Run the audio encoder through `keep` only (the paper's encoder ablation); restored on exit."""
    tower = arch.audio_tower(model)
    original = tower.layers
    keep = check_layers(list(keep), len(original), item="keep_encoder")
    if not keep:
        raise StcompressError("keep_encoder: the audio encoder needs at least one layer")
    tower.layers = nn.ModuleList([original[i] for i in keep])
    try:
        yield
    finally:
        tower.layers = original
