"""The training forward pass: what generation computes, with gradients, and logits only where needed.

transformers' Qwen2AudioForConditionalGeneration.forward projects every position (prompt and
~750 audio tokens included) onto the 156k vocabulary; training needs the target positions only
(~50 a clip). `TranslationLM` runs audio tower + projector (with gradients, so LoRA on the encoder
linears trains), splices the audio features into the prompt embeddings exactly as
`Translator.build_inputs` does, runs the decoder, and applies the LM head on the label positions.
It is an nn.Module so accelerate can wrap it (DDP / FSDP hooks need the root forward).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from stcompress.model import arch
from stcompress.prompt import IGNORE_INDEX
from stcompress.training.losses import chunked_cross_entropy_sum, cross_entropy_sum


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft model (LoRA layers stay injected in it)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def audio_embeddings(model: nn.Module, input_features: torch.Tensor | None = None, feature_attention_mask: torch.Tensor | None = None,
                     audio_states: torch.Tensor | None = None, audio_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Audio tower + projector with gradients: (total audio tokens of the batch, hidden), clip by clip.

    `audio_states` / `audio_lengths` (a TowerCache's stored tower output) skip the tower."""
    if audio_states is None:
        assert input_features is not None and feature_attention_mask is not None
        audio_states, audio_lengths = arch.tower_states(model, input_features, feature_attention_mask)
    assert audio_lengths is not None
    embeds = arch.project_audio(model, audio_states)
    keep = torch.arange(embeds.shape[1], device=embeds.device)[None, :] < audio_lengths.to(embeds.device)[:, None]
    return embeds[keep]


class TranslationLM(nn.Module):
    """Wraps a Qwen2-Audio model (or a peft model around one) for training and KD."""

    def __init__(self, model: nn.Module, *, loss_chunk: int = 0):
        super().__init__()
        self.model = model
        self.loss_chunk = loss_chunk  # > 0: `forward(..., ce_only=True)` computes the CE in chunks

    @property
    def base(self) -> nn.Module:
        return unwrap_peft(self.model)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
        input_features: torch.Tensor | None = None, feature_attention_mask: torch.Tensor | None = None,
        audio_states: torch.Tensor | None = None, audio_lengths: torch.Tensor | None = None, ce_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits at the N label positions (N, vocab), their target ids (N,)), in batch order.

        Audio comes as mel features (the tower runs) or as cached tower output (`audio_states`).
        `ce_only`: (summed CE over the N positions, target ids) instead, chunked when loss_chunk > 0;
        inside forward so that FSDP has the LM head gathered."""
        base = self.base
        embed = arch.embed_tokens(base)
        input_ids = input_ids.to(embed.weight.device)
        attention_mask = attention_mask.to(embed.weight.device)
        embeds = embed(input_ids)
        audio = audio_embeddings(base, input_features, feature_attention_mask, audio_states, audio_lengths)
        is_audio = (input_ids == arch.audio_token_id(base)).unsqueeze(-1)
        embeds = embeds.masked_scatter(is_audio, audio.to(device=embeds.device, dtype=embeds.dtype))
        hidden = arch.run_decoder(base, embeds, attention_mask, use_cache=False).last_hidden_state
        targets = labels[:, 1:].to(hidden.device)  # position t predicts token t + 1
        keep = targets != IGNORE_INDEX
        head, hidden, targets = arch.lm_head(base), hidden[:, :-1][keep], targets[keep]
        if ce_only and self.loss_chunk > 0:
            return chunked_cross_entropy_sum(hidden, head, targets, self.loss_chunk), targets
        if ce_only:
            return cross_entropy_sum(head(hidden), targets), targets
        return head(hidden), targets


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """eval() + no_grad for dev passes, then back to train().

    bitsandbytes' 4-bit layers repack their weights for a faster CPU kernel the first time they run
    in eval mode without gradients, and a later training forward then fails; keeping those layers
    in training mode (they have no dropout, so nothing else changes) prevents the repack.
    """
    model.eval()
    quantized = [m for m in model.modules() if type(m).__module__.startswith("bitsandbytes")]
    for m in quantized:
        m.training = True
    try:
        with torch.no_grad():
            yield
    finally:
        model.train()


def vocab_size(model: Any) -> int:
    return int(arch.lm_head(unwrap_peft(model)).out_features)
