"""Cheap proxies of layer importance, used to pre-filter candidates (approximations, labelled so).

Both run the decoder teacher-forced on the dev set (prompt + reference translation) instead of
generating:
- block_influence: ShortGPT's Block Influence (Men et al., 2024, "ShortGPT: Layers in Large
  Language Models are More Redundant Than You Expect"), 1 - mean cosine similarity between a
  layer's input and output hidden states (Gromov et al., 2024 use the same angular view). One
  forward pass per round scores every layer; a low BI means removable.
- tf_loss: cross-entropy of the reference translation with the candidate removed; one forward
  pass per candidate; a low loss means removable.
Each returns "higher = better to remove" so the search can rank by it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from stcompress.data.example import Example
from stcompress.errors import StcompressError
from stcompress.model import arch
from stcompress.model.layers import decoder_view
from stcompress.translate import AudioCache, Translator

PROXIES = {
    "block_influence": "ShortGPT Block Influence, Men et al. 2024 (arXiv 2403.03853)",
    "tf_loss": "teacher-forced reference cross-entropy with the layer removed",
}


def _batches(translator: Translator, examples: Sequence[Example], cache: AudioCache) -> Iterator[tuple]:
    size = max(1, translator.batch_size)
    for start in range(0, len(examples), size):
        batch = examples[start : start + size]
        targets = [translator.prompt.target_ids(ex.references[0]) for ex in batch]
        embeds, mask = translator.build_inputs(batch, cache, targets)
        yield embeds, mask, targets


def _decode(translator: Translator, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return arch.run_decoder(translator.model, embeds, mask).last_hidden_state


@torch.no_grad()
def block_influence(translator: Translator, examples: Sequence[Example], cache: AudioCache, keep: Sequence[int]) -> dict[int, float]:
    """BI of every layer in `keep` (original indices), measured inside the current decoder view."""
    model = translator.model
    sums = torch.zeros(len(keep), dtype=torch.float64)
    count = 0
    captured: dict[int, torch.Tensor] = {}

    def hook(index: int) -> Callable:
        def fn(module, args, kwargs, output):  # noqa: ANN001
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            captured[index] = F.cosine_similarity(x.float(), y.float(), dim=-1)
        return fn

    with decoder_view(model, keep):
        handles = [layer.register_forward_hook(hook(j), with_kwargs=True) for j, layer in enumerate(arch.decoder_layers(model))]
        try:
            for embeds, mask, _ in _batches(translator, examples, cache):
                _decode(translator, embeds, mask)
                real = mask.bool().cpu()
                for j in range(len(keep)):
                    sums[j] += captured[j].cpu()[real].double().sum()
                count += int(real.sum())
        finally:
            for h in handles:
                h.remove()
    return {layer: -(1.0 - float(sums[j] / count)) for j, layer in enumerate(keep)}


@torch.no_grad()
def reference_loss(translator: Translator, examples: Sequence[Example], cache: AudioCache) -> float:
    """Mean per-token cross-entropy of the references (prompt masked) under the current model."""
    head = arch.lm_head(translator.model)
    total, tokens = 0.0, 0
    for embeds, mask, targets in _batches(translator, examples, cache):
        hidden = _decode(translator, embeds, mask)
        width = mask.shape[1]
        for row, target in enumerate(targets):
            n = len(target)
            logits = head(hidden[row, width - n - 1 : width - 1]).float()
            labels = torch.tensor(target, device=logits.device)
            total += float(F.cross_entropy(logits, labels, reduction="sum"))
            tokens += n
    return total / max(tokens, 1)


def make_prefilter(name: str, translator: Translator, examples: Sequence[Example], *, component: str = "decoder") -> Callable:
    if name not in PROXIES:
        raise StcompressError(f"prefilter: unknown proxy {name!r}; use one of {', '.join(PROXIES)}")
    if component != "decoder":
        raise StcompressError("prefilter: proxies score decoder layers only; unset prefilter for the encoder search")
    cache = translator.encode(examples)
    n_layers = arch.num_decoder_layers(translator.model)

    def prefilter(removed: Sequence[int], layers: Sequence[int]) -> dict[int, float]:
        keep = [i for i in range(n_layers) if i not in set(removed)]
        if name == "block_influence":
            values = block_influence(translator, examples, cache, keep)
            return {layer: values[layer] for layer in layers}
        out = {}
        for layer in layers:
            with decoder_view(translator.model, [i for i in keep if i != layer]):
                out[layer] = -reference_loss(translator, examples, cache)
        return out

    return prefilter
