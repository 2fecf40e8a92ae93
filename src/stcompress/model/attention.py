"""SDPA attention for decoders with a single KV head, with keys and values materialised.

transformers' `sdpa` attention repeats K/V to the query heads (`repeat_kv`) when a mask is given.
With one KV head (Gemma 3 270M, the testbed's LM: 4 query heads, 1 KV head) that reshape needs
no copy, so `scaled_dot_product_attention` receives K/V as a view with stride 0 over the heads.
On CUDA (torch 2.11, H200, fp32) the kernel it then picks returns wrong values for every row of
a batch whose key length is 1 more than a multiple of 32 (65, 97, 129, 161); the same call with
materialised K/V, or on the CPU, is right (benchmarks/testbed/padding_check.py). In the testbed's
zh run it turned whole batches of translations into garbage on the GPU only.

`materialise_single_kv(model)` switches such a decoder to `sdpa_materialised_kv`: transformers'
own sdpa function and masks, given K/V already repeated into contiguous memory (the copy
transformers makes anyway for two or more KV heads). The result is the same arithmetic. It is a
runtime setting of the loaded model: transformers writes no attention implementation into
config.json, so a saved model loads with plain `sdpa` anywhere (tests/test_attention.py).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from stcompress.model import arch

log = logging.getLogger(__name__)

NAME = "sdpa_materialised_kv"


class _OneGroup:
    """The attention module as transformers' sdpa function reads it, with K/V already repeated."""

    num_key_value_groups = 1

    def __init__(self, module: nn.Module):
        self._module = module

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


def _sdpa_materialised_kv(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, *args: Any, **kwargs: Any) -> Any:
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1 and attention_mask is not None:
        key = repeat_kv(key, groups).contiguous()
        value = repeat_kv(value, groups).contiguous()
        return sdpa_attention_forward(_OneGroup(module), query, key, value, attention_mask, *args, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)


def register() -> None:
    """Make NAME a valid attention implementation (its masks: sdpa's). Idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if NAME not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(NAME, _sdpa_materialised_kv)
    if NAME not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(NAME, sdpa_mask)


def needs_materialised_kv(model: nn.Module) -> bool:
    """True for a decoder running transformers' sdpa with one KV head and more query heads."""
    config = arch.text_config(model)
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return getattr(config, "_attn_implementation", None) == "sdpa" and kv_heads == 1 and heads > 1


def materialise_single_kv(model: nn.Module) -> bool:
    """Switch the decoder to NAME where `needs_materialised_kv`; True if it was switched."""
    if not needs_materialised_kv(model):
        return False
    register()
    arch.text_config(model)._attn_implementation = NAME
    log.debug("decoder attention: %s (one KV head; see stcompress.model.attention)", NAME)
    return True
