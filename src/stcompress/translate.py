"""The one batched translation engine, shared by translate, evaluate, importance and distill.

Audio goes through the audio tower + projector once per clip (`AudioCache`); the decoder then
runs from `inputs_embeds`, so any number of decoder variants (the importance search evaluates
~200) reuse the same audio features, and variants that drop one layer of the current decoder
reuse its prefill below that layer (`PrefillStore`, `model/prefill_reuse.py`). Batches are
length-sorted and left-padded; on CUDA out-of-memory the batch size halves and the batch is
retried. Results come back in input order.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from stcompress.config import GenerationConfig, PromptConfig
from stcompress.data.example import Example
from stcompress.errors import StcompressError
from stcompress.metrics.efficiency import speed_report
from stcompress.model import arch, prefill_reuse, static_decode
from stcompress.model.layers import decoder_view
from stcompress.model.tower_memo import tower_outputs
from stcompress.progress import bar as progress_bar
from stcompress.prompt import PromptBuilder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hypothesis:
    id: str
    text: str
    n_tokens: int  # generated tokens, end-of-turn included


@dataclass
class RunStats:
    seconds: float = 0.0
    n_segments: int = 0
    n_generated_tokens: int = 0
    final_batch_size: int = 0
    peak_gpu_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        report = speed_report(self.seconds, self.n_segments, self.n_generated_tokens, self.peak_gpu_bytes)
        return {**report, "final_batch_size": self.final_batch_size}


@dataclass
class AudioCache:
    """Audio tower + projector output per example id: (n_audio_tokens, hidden) tensors."""

    embeds: dict[str, torch.Tensor] = field(default_factory=dict)

    def __contains__(self, example_id: str) -> bool:
        return example_id in self.embeds

    def __len__(self) -> int:
        return len(self.embeds)

    def n_tokens(self, example_id: str) -> int:
        return int(self.embeds[example_id].shape[0])


PREFILL_ENV = "STCOMPRESS_PREFILL_REUSE_MB"


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class PrefillStore:
    """Prefills of one decoder view per batch, for decoding it and its variants without one layer.

    Bound to the view it was filled on: a different layer list empties it first, so a stale
    prefill is never reused. A prefill is kept only while it fits: under `limit_bytes` in all
    (STCOMPRESS_PREFILL_REUSE_MB; 0 turns reuse off), and each at most half of the memory still
    available on its device (the rest is for decoding); a batch that does not fit decodes the plain way.
    """

    def __init__(self, limit_bytes: int | None = None):
        if limit_bytes is None and os.environ.get(PREFILL_ENV):
            limit_bytes = int(float(os.environ[PREFILL_ENV]) * 2**20)
        self.limit = limit_bytes
        self.entries: dict[tuple[str, ...], prefill_reuse.Prefill] = {}
        self.nbytes = 0
        self.view: tuple[int, ...] = ()
        self.hits = self.misses = self.refused = 0

    def clear(self) -> None:
        self.entries.clear()
        self.nbytes = 0

    def bind(self, model: Any) -> None:
        view = tuple(id(layer) for layer in arch.decoder_layers(model))
        if view != self.view:
            self.clear()
            self.view = view

    def room(self, nbytes: int, device: torch.device) -> bool:
        if self.limit is not None and self.nbytes + nbytes > self.limit:
            return False
        return nbytes <= _available_bytes(device) // 2

    def put(self, key: tuple[str, ...], pre: prefill_reuse.Prefill) -> None:
        self.entries[key] = pre
        self.nbytes += pre.nbytes


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class Translator:
    """Batched speech translation with a Qwen2-Audio model."""

    def __init__(
        self,
        model: Any,
        processor: Any,
        prompt: PromptConfig | None = None,
        generation: GenerationConfig | None = None,
        *,
        progress: bool = True,
        remember_audio: bool = True,
    ):
        """`remember_audio`: reuse tower output the same tower computed earlier in this process
        (`tower_memo`); off where the translation itself is timed (evaluate's segments/s)."""
        self.remember_audio = remember_audio
        self.model = model
        self.processor = processor
        self.prompt = PromptBuilder(processor, prompt)
        self.generation = generation or GenerationConfig()
        self.progress = progress
        self.batch_size = self.generation.batch_size
        self.tokenizer = processor.tokenizer

    # -- audio -----------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, examples: Sequence[Example], cache: AudioCache | None = None) -> AudioCache:
        """Fill `cache` with the audio embeddings of examples not yet in it."""
        cache = cache if cache is not None else AudioCache()
        todo = [ex for ex in examples if ex.id not in cache]
        if not todo:
            return cache
        bar = progress_bar(len(todo), "audio", "seg", progress=self.progress, leave=False)
        states = tower_outputs(self.model, self.processor.feature_extractor, [ex.audio for ex in todo],
                               on_batch=bar.update, remember=self.remember_audio)
        bar.close()
        for start in range(0, len(todo), max(1, self.batch_size)):
            chunk = range(start, min(start + max(1, self.batch_size), len(todo)))
            joined = arch.project_audio(self.model, torch.cat([states[i] for i in chunk]))
            for i, emb in zip(chunk, joined.split([states[i].shape[0] for i in chunk])):
                cache.embeds[todo[i].id] = emb
        return cache

    # -- prompt + embeddings ---------------------------------------------------------------

    def build_inputs(
        self, examples: Sequence[Example], cache: AudioCache, targets: Sequence[Sequence[int]] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded inputs_embeds and attention mask for a batch (audio features spliced in).

        With `targets`, each row continues with its target ids (teacher forcing): they are the
        last len(target) positions of the row.
        """
        ids = [self.prompt.input_ids(ex.target_lang, cache.n_tokens(ex.id)) for ex in examples]
        if targets is not None:
            ids = [row + list(t) for row, t in zip(ids, targets)]
        width = max(len(row) for row in ids)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        embed = arch.embed_tokens(self.model)
        device = embed.weight.device
        input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long, device=device)
        mask = torch.zeros((len(ids), width), dtype=torch.long, device=device)
        for i, row in enumerate(ids):
            input_ids[i, width - len(row) :] = torch.tensor(row, device=device)
            mask[i, width - len(row) :] = 1
        embeds = embed(input_ids)
        audio = torch.cat([cache.embeds[ex.id] for ex in examples]).to(device=device, dtype=embeds.dtype)
        audio_positions = (input_ids == arch.audio_token_id(self.model)).unsqueeze(-1)
        return embeds.masked_scatter(audio_positions, audio), mask

    # -- generation ------------------------------------------------------------------------

    def _generate_kwargs(self) -> dict[str, Any]:
        gen = self.generation
        base = self.model.generation_config
        eos = base.eos_token_id if base.eos_token_id is not None else self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        pad = base.pad_token_id if base.pad_token_id is not None else self.tokenizer.pad_token_id
        kwargs: dict[str, Any] = {
            "max_new_tokens": gen.max_new_tokens,
            "do_sample": gen.do_sample,
            "num_beams": gen.num_beams,
            # Passed explicitly: the Instruct model's own generation config samples (top_p 0.5,
            # repetition_penalty 1.1); the paper decodes greedily with repetition_penalty 1.0.
            "repetition_penalty": gen.repetition_penalty,
            "eos_token_id": eos,
            "pad_token_id": pad,
        }
        if gen.do_sample:
            kwargs.update(temperature=gen.temperature, top_p=gen.top_p, top_k=0)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs

    def _eos_ids(self, kwargs: dict[str, Any]) -> set[int]:
        eos = kwargs["eos_token_id"]
        return set(eos if isinstance(eos, (list, tuple)) else [eos])

    @torch.no_grad()
    def _greedy(self, embeds: torch.Tensor, mask: torch.Tensor, max_new: int, eos: set[int], pad: int) -> torch.Tensor:
        """Greedy decoding with a KV cache; the LM head runs on the last position only.

        transformers' generate() would project every prompt position onto the 156k vocabulary
        (gigabytes of logits at batch 32); decoding needs only the last one.
        """
        decoder, head = arch.text_model(self.model), arch.lm_head(self.model)
        positions = arch.mask_positions(mask)
        out = decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True)
        if self.generation.static_cache and static_decode.supported(self.model):
            first = head(out.last_hidden_state[:, -1]).argmax(-1)
            runner = static_decode.StaticGreedy(self.model, out.past_key_values, mask, positions, max_new, eos, pad)
            del out
            return runner.run(first)
        eos_ids = torch.tensor(sorted(eos), device=mask.device)
        done = torch.zeros(mask.shape[0], dtype=torch.bool, device=mask.device)
        steps = []
        for _ in range(max_new):
            token = head(out.last_hidden_state[:, -1]).argmax(-1)
            token = token.masked_fill(done, pad)
            steps.append(token)
            done |= torch.isin(token, eos_ids)
            if bool(done.all()) or len(steps) == max_new:
                break
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            positions = positions[:, -1:] + 1
            out = decoder(
                input_ids=token[:, None], attention_mask=mask, position_ids=positions,
                past_key_values=out.past_key_values, use_cache=True,
            )
        return torch.stack(steps, dim=1)

    def reuses_prefill(self) -> bool:
        """True where `translate(prefills=...)` shares prefill work: greedy decoding on the static path."""
        gen = self.generation
        greedy = not gen.do_sample and gen.num_beams == 1 and gen.repetition_penalty == 1.0
        return greedy and gen.static_cache and prefill_reuse.supported(self.model)

    def _without(self, skip: int | None) -> contextlib.AbstractContextManager[None]:
        if skip is None:
            return contextlib.nullcontext()
        return decoder_view(self.model, [i for i in range(arch.num_decoder_layers(self.model)) if i != skip])

    @torch.no_grad()
    def _greedy_reusing(self, batch: Sequence[Example], cache: AudioCache, kwargs: dict[str, Any],
                        store: PrefillStore, skip: int | None) -> torch.Tensor:
        """Greedy decoding from the view's stored prefill of this batch (made and stored on a miss)."""
        max_new, eos, pad = kwargs["max_new_tokens"], self._eos_ids(kwargs), kwargs["pad_token_id"]
        store.bind(self.model)
        key = tuple(ex.id for ex in batch)
        pre = store.entries.get(key)
        if pre is None:
            embeds, mask = self.build_inputs(batch, cache)
            if not store.room(prefill_reuse.estimate_bytes(self.model, *mask.shape, embeds.dtype), mask.device):
                store.refused += 1
                with self._without(skip):
                    return self._greedy(embeds, mask, max_new, eos, pad)
            store.misses += 1
            pre = prefill_reuse.prefill(self.model, embeds, mask, arch.mask_positions(mask))
            store.put(key, pre)
        else:
            store.hits += 1
        layers = list(arch.decoder_layers(self.model))
        if skip is None:
            kv, last = pre.kv, pre.last_hidden
        else:
            kv, last = prefill_reuse.without(self.model, pre, skip)
            del layers[skip]
        first = arch.lm_head(self.model)(last).argmax(-1)
        runner = static_decode.StaticGreedy(self.model, kv, pre.mask, pre.positions, max_new, eos, pad, layers=layers)
        del kv
        return runner.run(first)

    @torch.no_grad()
    def _generate_batch(self, batch: Sequence[Example], cache: AudioCache, kwargs: dict[str, Any],
                        prefills: PrefillStore | None = None, skip: int | None = None) -> list[Hypothesis]:
        eos = self._eos_ids(kwargs)
        if prefills is not None and self.reuses_prefill():
            new = self._greedy_reusing(batch, cache, kwargs, prefills, skip)
        else:
            with self._without(skip):
                embeds, mask = self.build_inputs(batch, cache)
                if kwargs["do_sample"] or kwargs["num_beams"] > 1 or kwargs["repetition_penalty"] != 1.0:
                    new = self.model.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)
                else:
                    new = self._greedy(embeds, mask, kwargs["max_new_tokens"], eos, kwargs["pad_token_id"])
        hyps = []
        for ex, row in zip(batch, new.tolist()):
            n = next((i + 1 for i, tok in enumerate(row) if tok in eos), len(row))
            text = self.tokenizer.decode(row[:n], skip_special_tokens=True).strip()
            hyps.append(Hypothesis(id=ex.id, text=text, n_tokens=n))
        return hyps

    def translate(self, examples: Sequence[Example], cache: AudioCache | None = None, stats: RunStats | None = None, *,
                  prefills: PrefillStore | None = None, skip_layer: int | None = None) -> list[Hypothesis]:
        """Translate `examples`; hypotheses come back in input order.

        `skip_layer`: translate with the current decoder view's layer at that index left out.
        `prefills`: reuse (and fill) the current view's prefills where `reuses_prefill()`; the
        same tokens as without, only less prefill work when several variants share a view.
        """
        if not examples:
            return []
        start = time.perf_counter()
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        if self.generation.do_sample:
            torch.manual_seed(self.generation.seed)
        cache = self.encode(examples, cache)
        order = list(range(len(examples)))
        if self.generation.sort_by_length:
            order.sort(key=lambda i: -cache.n_tokens(examples[i].id))  # longest first: OOM shows early
        kwargs = self._generate_kwargs()
        reuse = {k: v for k, v in (("prefills", prefills), ("skip", skip_layer)) if v is not None}
        results: dict[int, Hypothesis] = {}
        bar = progress_bar(len(order), "translate", "seg", progress=self.progress, leave=False)
        pos = 0
        while pos < len(order):
            idx = order[pos : pos + self.batch_size]
            try:
                hyps = self._generate_batch([examples[i] for i in idx], cache, kwargs, **reuse)
            except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
                if not is_out_of_memory(exc):
                    raise
                if prefills is not None:
                    prefills.clear()  # its batches were of the old size; free their memory too
                self._back_off()
                continue
            results.update(zip(idx, hyps))
            pos += len(idx)
            bar.update(len(idx))
        bar.close()
        out = [results[i] for i in range(len(examples))]
        if stats is not None:
            stats.seconds += time.perf_counter() - start
            stats.n_segments += len(out)
            stats.n_generated_tokens += sum(h.n_tokens for h in out)
            stats.final_batch_size = self.batch_size
            stats.peak_gpu_bytes = torch.cuda.max_memory_allocated() if cuda else None
        return out

    def _back_off(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if self.batch_size == 1:
            raise StcompressError(
                "generation.batch_size: out of GPU memory even at batch size 1; lower generation.max_new_tokens, "
                "use model.dtype bfloat16 or model.load_in_4bit, or a larger GPU"
            )
        self.batch_size = max(1, self.batch_size // 2)
        log.warning("out of memory: batch size lowered to %d", self.batch_size)
