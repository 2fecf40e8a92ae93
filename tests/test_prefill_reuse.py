"""Prefill reuse in the importance search: the same tokens, scores and removal order as the plain path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from stcompress.config import GenerationConfig
from stcompress.data.example import Example
from stcompress.importance.evaluator import GenerationEvaluator
from stcompress.importance.search import GreedySearch, SearchSettings, candidate_layers
from stcompress.model import arch, prefill_reuse
from stcompress.model.layers import decoder_view
from stcompress.model.tiny import tiny_model_cache
from stcompress.translate import PrefillStore, Translator

N_LAYERS = 6


@pytest.fixture(scope="module")
def loaded():
    path = tiny_model_cache(text_layers=N_LAYERS)
    model = transformers.Qwen2AudioForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32).eval()
    return model, transformers.AutoProcessor.from_pretrained(str(path))


def _examples(speech_like, seconds=(2.0, 5.5, 1.0, 3.3, 7.9)):
    return [Example(id=f"ex{i}", audio=speech_like(s, seed=i), target_lang="de", references=("Das ist ein Satz.",))
            for i, s in enumerate(seconds)]


def _translator(loaded, **gen):
    model, processor = loaded
    return Translator(model, processor, generation=GenerationConfig(**{"max_new_tokens": 10, "batch_size": 3, **gen}),
                      progress=False)


def test_prefill_without_a_layer_equals_that_views_own_prefill(loaded, speech_like):
    """KV and last hidden state of the view without layer i, bit for bit, for every i (left-padded batch)."""
    model, _ = loaded
    translator = _translator(loaded)
    examples = _examples(speech_like)
    embeds, mask = translator.build_inputs(examples, translator.encode(examples))
    positions = arch.mask_positions(mask)
    pre = prefill_reuse.prefill(model, embeds, mask, positions)
    assert pre.nbytes == prefill_reuse.estimate_bytes(model, *mask.shape, embeds.dtype)
    for skip in range(N_LAYERS):
        kv, last = prefill_reuse.without(model, pre, skip)
        with decoder_view(model, [i for i in range(N_LAYERS) if i != skip]):
            out = arch.run_decoder(model, embeds, mask, use_cache=True)
            want = [(out.past_key_values.layers[i].keys, out.past_key_values.layers[i].values)
                    if hasattr(out.past_key_values, "layers")
                    else (out.past_key_values.key_cache[i], out.past_key_values.value_cache[i]) for i in range(N_LAYERS - 1)]
        assert torch.equal(last, out.last_hidden_state[:, -1]), skip
        assert len(kv) == N_LAYERS - 1
        assert all(torch.equal(a, b) and torch.equal(c, d) for (a, c), (b, d) in zip(kv, want)), skip


@pytest.mark.parametrize("base", [(), (2,)])
def test_every_candidate_translates_as_the_plain_path(loaded, speech_like, base):
    """Within a round's view: each layer left out (and none) gives the plain path's hypotheses."""
    model, _ = loaded
    translator = _translator(loaded)
    assert translator.reuses_prefill()
    examples = _examples(speech_like)
    cache = translator.encode(examples)
    keep = [i for i in range(N_LAYERS) if i not in base]
    store = PrefillStore()
    for skip in [None, *reversed(range(len(keep)))]:
        with decoder_view(model, keep):
            fast = translator.translate(examples, cache=cache, prefills=store, skip_layer=skip)
        with decoder_view(model, [k for j, k in enumerate(keep) if j != skip]):
            plain = translator.translate(examples, cache=cache)
        assert fast == plain, skip
    assert store.misses == 2 and store.hits == 2 * len(keep)  # two batches, filled once each


def test_store_never_reuses_another_views_prefill(loaded, speech_like):
    model, _ = loaded
    translator = _translator(loaded)
    examples = _examples(speech_like)
    cache = translator.encode(examples)
    store = PrefillStore()
    translator.translate(examples, cache=cache, prefills=store)
    with decoder_view(model, [0, 1, 3, 4, 5]):
        fast = translator.translate(examples, cache=cache, prefills=store)
        plain = translator.translate(examples, cache=cache)
    assert fast == plain and store.misses == 4 and store.hits == 0


def test_prefill_over_the_memory_limit_decodes_the_plain_way(loaded, speech_like):
    model, _ = loaded
    translator = _translator(loaded)
    examples = _examples(speech_like)
    cache = translator.encode(examples)
    store = PrefillStore(limit_bytes=0)
    fast = translator.translate(examples, cache=cache, prefills=store, skip_layer=3)
    with decoder_view(model, [0, 1, 2, 4, 5]):
        plain = translator.translate(examples, cache=cache)
    assert fast == plain and store.refused == 2 and not store.entries


def _search(translator, examples, tmp: Path, reuse: bool):
    evaluator = GenerationEvaluator(translator, examples, ["chrf++", "bleu"], reuse_prefill=reuse)
    assert (evaluator.prefills is not None) is reuse
    settings = SearchSettings(candidates=candidate_layers(N_LAYERS, None), n_layers=N_LAYERS, metric="chrf++",
                              total_segments=len(examples), rounds=2)
    search = GreedySearch(settings, evaluator, tmp)
    return search.run(), search.state.all_records()


def _count_layer_calls(model):
    calls = [0]
    handles = [layer.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1)) for layer in arch.decoder_layers(model)]
    return calls, handles


def test_search_with_reuse_gives_the_same_order_and_scores_with_less_prefill(loaded, speech_like, tmp_path):
    model, _ = loaded
    examples = _examples(speech_like)
    runs = {}
    for reuse in (False, True):
        calls, handles = _count_layer_calls(model)
        try:
            result, records = _search(_translator(loaded), examples, tmp_path / str(reuse), reuse)
        finally:
            for h in handles:
                h.remove()
        runs[reuse] = (result.removal_order, [(r.round, r.layer, r.scores, r.hypotheses_sha256) for r in records], calls[0])
    assert runs[True][:2] == runs[False][:2]
    order = runs[True][0]
    batches = 2
    # Plain: every variant's prefill runs all its layers. Reuse: the baseline's prefill serves
    # round 1; round 2 runs its view's prefill once, then each candidate only the layers above it.
    plain = batches * (N_LAYERS + (N_LAYERS - 2) * (N_LAYERS - 1) + (N_LAYERS - 3) * (N_LAYERS - 2))
    keep2 = [i for i in range(N_LAYERS) if i != order[0]]
    above = sum(N_LAYERS - 1 - p for p in range(1, N_LAYERS - 1)) \
        + (N_LAYERS - 1) + sum(len(keep2) - 1 - keep2.index(c) for c in keep2[1:-1])
    assert runs[False][2] == plain
    assert runs[True][2] == batches * (N_LAYERS + above) < plain


def test_sliding_window_decoder_keeps_the_plain_path(speech_like):
    """Gemma 3's sliding layers have no static decode path, so no prefill reuse either (stated, not silent)."""
    path = tiny_model_cache(text_model_type="gemma3_text", text_layers=3, sliding_window=8)
    model = transformers.Qwen2AudioForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32).eval()
    translator = _translator((model, transformers.AutoProcessor.from_pretrained(str(path))))
    assert not translator.reuses_prefill()
    evaluator = GenerationEvaluator(translator, _examples(speech_like, (1.0, 2.0)), ["chrf"])
    assert evaluator.prefills is None
    assert evaluator.evaluate([1], 2)[0]["chrf"] >= 0


def test_out_of_memory_empties_the_store_and_the_smaller_batches_refill_it(loaded, speech_like, monkeypatch):
    model, _ = loaded
    examples = _examples(speech_like)
    translator = _translator(loaded, batch_size=4)
    cache = translator.encode(examples)
    store = PrefillStore()
    translator.translate(examples, cache=cache, prefills=store)  # batches of 4 and 1 stored
    assert store.misses == 2 and len(store.entries) == 2
    real = translator._greedy_reusing

    def flaky(batch, *args):
        if len(batch) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(batch, *args)

    monkeypatch.setattr(translator, "_greedy_reusing", flaky)
    fast = translator.translate(examples, cache=cache, prefills=store, skip_layer=2)
    with decoder_view(model, [0, 1, 3, 4, 5]):
        plain = _translator(loaded, batch_size=2).translate(examples, cache=cache)
    assert fast == plain and translator.batch_size == 2
    assert all(len(key) <= 2 for key in store.entries) and len(store.entries) == 3
