"""One prefill per importance round, shared by every candidate that removes one more layer.

In a round of the greedy search every candidate drops one layer i from the current decoder. Up
to layer i the candidate computes exactly what the current decoder computes on the same prompt
(the attention mask and rotary positions do not depend on the layers), so the prefill runs once on
the current decoder and keeps, per layer, the hidden state entering it, its KV cache and the
keyword arguments the decoder passed it. A candidate then reuses the KV of layers < i, runs
layers > i from the saved input of layer i, and decodes from there: about half the prefill work
of a round, with bit-identical outputs (the same modules on the same tensors; tests/test_prefill_reuse.py
compares tokens with the plain path on CPU in fp32).

Only where the static decode path applies (`static_decode.supported`: Qwen2, full attention in
every layer): Gemma 3's sliding-window layers, 4-bit and LoRA-wrapped layers keep the plain path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from stcompress.model import arch, static_decode

KV = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Prefill:
    """A decoder view's prefill of one batch: enough to re-run any suffix of its layers."""

    inputs: list[torch.Tensor]  # the hidden state entering each layer, (B, T, H)
    kv: list[KV]  # each layer's keys and values after rotary, (B, kv_heads, T, head_dim)
    layer_kwargs: list[dict[str, Any]]  # what the decoder passed each layer (mask, rotary, ...)
    last_hidden: torch.Tensor  # final-norm output at the last position, (B, H)
    mask: torch.Tensor
    positions: torch.Tensor

    @property
    def nbytes(self) -> int:
        tensors = [*self.inputs, *(t for pair in self.kv for t in pair)]
        return sum(t.numel() * t.element_size() for t in tensors)


def supported(model: nn.Module) -> bool:
    return static_decode.supported(model)


def estimate_bytes(model: nn.Module, batch: int, length: int, dtype: torch.dtype) -> int:
    """Bytes a `Prefill` of (batch, length) holds: per layer one hidden state plus keys and values."""
    config = arch.text_config(model)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    per_token = config.hidden_size + 2 * config.num_key_value_heads * head_dim
    element = torch.empty((), dtype=dtype).element_size()
    return arch.num_decoder_layers(model) * batch * length * per_token * element


class _Recorder:
    """Stands in for the KV cache while layers are replayed: keeps what each layer writes.

    Returns a contiguous copy, as transformers' DynamicCache does on a layer's first update (it
    concatenates onto an empty tensor), so attention sees tensors of the same values and layout.
    """

    def __init__(self) -> None:
        self.kv: dict[int, KV] = {}

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, cache_kwargs: Any = None) -> KV:
        self.kv[layer_idx] = (key.contiguous(), value.contiguous())
        return self.kv[layer_idx]


def _output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def prefill(model: nn.Module, embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> Prefill:
    """transformers' own prefill of the current decoder view, recording each layer's input."""
    decoder = arch.text_model(model)
    layers = list(arch.decoder_layers(model))
    inputs: list[torch.Tensor | None] = [None] * len(layers)
    kwargs: list[dict[str, Any] | None] = [None] * len(layers)

    def hook(index: int) -> Any:
        def fn(module: nn.Module, args: tuple, kw: dict[str, Any]) -> None:
            inputs[index] = args[0] if args else kw["hidden_states"]
            # The cache object is left out (`without` passes its own): keys and values are in `kv`.
            kwargs[index] = {k: (None if k in _CACHE_KEYS else v) for k, v in kw.items() if k != "hidden_states"}
        return fn

    handles = [layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        out = decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True)
    finally:
        for h in handles:
            h.remove()
    kv = [static_decode.layer_kv(out.past_key_values, i) for i in range(len(layers))]
    return Prefill(inputs=inputs, kv=kv, layer_kwargs=kwargs,  # type: ignore[arg-type]
                   last_hidden=out.last_hidden_state[:, -1], mask=mask, positions=positions)


_CACHE_KEYS = ("past_key_values", "past_key_value")  # 5.x and 4.5x; 4.57 accepts both


def _cache_key(kw: dict[str, Any]) -> str:
    return next((k for k in _CACHE_KEYS if k in kw), _CACHE_KEYS[0])


@torch.no_grad()
def without(model: nn.Module, pre: Prefill, skip: int) -> tuple[list[KV], torch.Tensor]:
    """KV of every layer but `skip` (an index into the view `pre` was made on) and the final
    hidden state at the last position, as the view without that layer computes them."""
    decoder = arch.text_model(model)
    layers = list(arch.decoder_layers(model))
    x = pre.inputs[skip]
    kv = list(pre.kv[:skip])
    for index in range(skip + 1, len(layers)):
        kw = dict(pre.layer_kwargs[index])
        recorder = _Recorder()
        kw[_cache_key(kw)] = recorder
        x = _output(layers[index](x, **kw))
        kv.append(recorder.kv[layers[index].self_attn.layer_idx])
    return kv, decoder.norm(x)[:, -1]
