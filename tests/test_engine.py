"""The prompt builder and the batched translation engine on a tiny random Qwen2-Audio."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from stcompress.config import GenerationConfig, PromptConfig
from stcompress.data.example import Example
from stcompress.errors import StcompressError
from stcompress.model import arch, static_decode, tower_memo
from stcompress.prompt import PromptBuilder, num_audio_tokens
from stcompress.translate import AudioCache, RunStats, Translator

PAPER_PROMPT_DE = (
    "<|im_start|>system\nYou are a professional translator.<|im_end|>\n"
    "<|im_start|>user\nAudio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
    "Translate the English speech into German:<|im_end|>\n<|im_start|>assistant\n"
)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    model = transformers.Qwen2AudioForConditionalGeneration.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    processor = transformers.AutoProcessor.from_pretrained(str(tiny_model_dir))
    model.eval()
    return model, processor


def _examples(speech_like, seconds=(2.0, 5.5, 1.0, 3.3, 7.9), lang="de"):
    return [
        Example(id=f"ex{i}", audio=speech_like(s, seed=i), target_lang=lang, references=("ref",))
        for i, s in enumerate(seconds)
    ]


def _gen(**kw):
    return GenerationConfig(**{"max_new_tokens": 12, "batch_size": 4, **kw})


def test_prompt_renders_paper_string(loaded):
    _, processor = loaded
    builder = PromptBuilder(processor, PromptConfig())
    assert builder.render("de") == PAPER_PROMPT_DE
    assert builder.render("zh") == PAPER_PROMPT_DE.replace("German", "Chinese")


def test_prompt_ids_match_processor_expansion(loaded, speech_like):
    _, processor = loaded
    builder = PromptBuilder(processor)
    audio = speech_like(8.0, seed=1)
    inputs = processor(text=PAPER_PROMPT_DE, audio=[audio], sampling_rate=16000, return_tensors="pt")
    n = num_audio_tokens(int(inputs["feature_attention_mask"].sum()))
    assert n == 200  # 8 s -> 200 audio tokens (PAPER.md)
    assert builder.input_ids("de", n) == inputs["input_ids"][0].tolist()


def test_engine_equals_transformers_own_generate(loaded, speech_like):
    """Cached audio features + inputs_embeds decode exactly like model.generate on processor inputs."""
    model, processor = loaded
    ex = _examples(speech_like, seconds=(4.2,))[0]
    # The Instruct model samples by default; the engine must still decode greedily.
    model.generation_config.repetition_penalty = 1.3
    try:
        hyp = Translator(model, processor, generation=_gen(), progress=False).translate([ex])[0]
    finally:
        model.generation_config.repetition_penalty = 1.0
    inputs = processor(text=PAPER_PROMPT_DE, audio=[ex.audio], sampling_rate=16000, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False, repetition_penalty=1.0)
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    eos = {151645, 151643}
    n = next((i + 1 for i, t in enumerate(new) if t in eos), len(new))
    assert hyp.n_tokens == n
    assert hyp.text == processor.tokenizer.decode(new[:n], skip_special_tokens=True).strip()


def test_batched_equals_unbatched(loaded, speech_like):
    model, processor = loaded
    examples = _examples(speech_like)
    one = Translator(model, processor, generation=_gen(batch_size=1), progress=False).translate(examples)
    many = Translator(model, processor, generation=_gen(batch_size=3), progress=False).translate(examples)
    assert [h.id for h in many] == [ex.id for ex in examples]  # input order, not length order
    assert [(h.text, h.n_tokens) for h in many] == [(h.text, h.n_tokens) for h in one]
    assert len({h.text for h in one}) > 1  # the tiny model's output depends on the audio


def test_audio_cache_is_reused(loaded, speech_like, monkeypatch):
    model, processor = loaded
    examples = _examples(speech_like, seconds=(1.5, 2.5))
    translator = Translator(model, processor, generation=_gen(), progress=False)
    cache = translator.encode(examples)
    calls = []
    monkeypatch.setattr(arch, "tower_states", lambda *a, **k: calls.append(1) or [])
    first = translator.translate(examples, cache=cache)
    second = translator.translate(examples, cache=cache)
    assert calls == [] and first == second and len(cache) == 2


def test_audio_features_are_per_clip_and_remembered_per_tower(loaded, speech_like, monkeypatch):
    """Batched tower output equals clip-by-clip; the same tower never encodes a clip twice in a
    process, and a changed tower (any weight) encodes again."""
    model, processor = loaded
    audio = [speech_like(3.0, seed=5), speech_like(6.0, seed=6)]
    extractor = processor.feature_extractor
    batched = tower_memo.tower_outputs(model, extractor, audio)
    tower_memo.MEMO.clear()
    single = tower_memo.tower_outputs(model, extractor, audio[1:])
    feats = extractor(audio, sampling_rate=16000, padding="max_length", return_attention_mask=True)
    assert [t.shape[0] for t in batched] == [num_audio_tokens(int(sum(m))) for m in feats["attention_mask"]]
    assert torch.equal(batched[1], single[0])
    calls = []
    real = arch.tower_states
    monkeypatch.setattr(arch, "tower_states", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    again = tower_memo.tower_outputs(model, extractor, audio)
    assert calls == [1] and torch.equal(again[1], single[0])  # only the clip not seen yet
    with torch.no_grad():
        arch.audio_tower(model).layers[0].fc1.weight[0, 0] += 1e-3
    try:
        tower_memo.tower_outputs(model, extractor, audio)
        assert calls == [1, 1, 1]
    finally:
        with torch.no_grad():
            arch.audio_tower(model).layers[0].fc1.weight[0, 0] -= 1e-3


def test_memo_dir_carries_tower_outputs_to_a_later_process(loaded, speech_like, monkeypatch, tmp_path):
    """STCOMPRESS_TOWER_MEMO_DIR: a new process (an empty memo) reads what an earlier one encoded,
    bit for bit, without running the tower; a changed tower misses (its own fingerprint folder)."""
    model, processor = loaded
    extractor = processor.feature_extractor
    monkeypatch.setenv(tower_memo.MEMO_DIR_ENV, str(tmp_path / "memo"))
    audio = [speech_like(1.2, seed=31), speech_like(2.5, seed=32)]
    first = tower_memo.tower_outputs(model, extractor, audio)
    (fp_dir,) = (tmp_path / "memo").iterdir()
    assert sorted(p.suffix for p in fp_dir.iterdir()) == [".pt", ".pt"]  # no temporary file left
    tower_memo.MEMO.clear()  # what a new process starts with
    calls = []
    real = arch.tower_states
    monkeypatch.setattr(arch, "tower_states", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    again = tower_memo.tower_outputs(model, extractor, audio)
    assert calls == [] and tower_memo.MEMO.disk_hits == 2
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    with torch.no_grad():
        arch.audio_tower(model).layers[0].fc1.weight[0, 0] += 1e-3
    try:
        tower_memo.MEMO.clear()
        changed = tower_memo.tower_outputs(model, extractor, audio)
        assert len(calls) == 2 and len(list((tmp_path / "memo").iterdir())) == 2
        assert not torch.equal(changed[0], first[0])
    finally:
        with torch.no_grad():
            arch.audio_tower(model).layers[0].fc1.weight[0, 0] -= 1e-3


def test_memo_hits_equal_a_fresh_computation_in_any_grouping(loaded, speech_like):
    """A resumed `run` finds other clips in the memo than the uninterrupted one did: its outputs
    must be the same bits, whichever clips were computed together (issue 9 item 10)."""
    model, processor = loaded
    extractor = processor.feature_extractor
    clips = [speech_like(s, seed=20 + i) for i, s in enumerate((0.7, 2.3, 1.1, 3.0, 1.6))]
    tower_memo.MEMO.clear()
    memo = tower_memo.tower_outputs(model, extractor, clips)  # one call: all five together
    hits = tower_memo.tower_outputs(model, extractor, clips[::-1])
    assert tower_memo.MEMO.hits == 5
    fresh = [*tower_memo.tower_outputs(model, extractor, clips[3:], remember=False),
             *tower_memo.tower_outputs(model, extractor, clips[:3][::-1], remember=False)[::-1]]
    fresh = fresh[2:] + fresh[:2]
    assert all(torch.equal(a, b) for a, b in zip(memo, fresh))
    assert all(torch.equal(a, b) for a, b in zip(memo, hits[::-1]))
    tower_memo.MEMO.clear()
    embeds = []
    for batch_size in (5, 2):  # the translation engine, fresh each time, two batchings
        tr = Translator(model, processor, generation=_gen(batch_size=batch_size), progress=False)
        cache = tr.encode(_examples(speech_like, seconds=(0.7, 2.3, 1.1, 3.0, 1.6)))
        embeds.append(cache.embeds)
        tower_memo.MEMO.clear()
    assert embeds[0].keys() == embeds[1].keys()
    assert all(torch.equal(embeds[0][k], embeds[1][k]) for k in embeds[0])


def test_trimmed_tower_equals_transformers_full_window(loaded, speech_like):
    """arch.tower_states runs only the frames that exist; transformers' encoder runs all 3000 with
    padding masked out of attention. Content positions must come out the same, with gradients."""
    model, processor = loaded
    audio = [speech_like(1.3, seed=7), speech_like(4.1, seed=8)]
    feats = processor.feature_extractor(
        audio, sampling_rate=16000, padding="max_length", return_attention_mask=True, return_tensors="pt"
    )
    tower = arch.audio_tower(model)
    conv_lengths, out_lengths = tower._get_feat_extract_output_lengths(feats["attention_mask"].sum(-1))
    width = tower.config.max_source_positions
    pad = torch.arange(width)[None, :] >= conv_lengths[:, None]
    mask = torch.zeros(2, 1, width, width).masked_fill_(pad[:, None, None, :], torch.finfo(torch.float32).min)
    with torch.no_grad():
        full = tower(feats["input_features"], attention_mask=mask).last_hidden_state
    features = feats["input_features"].clone().requires_grad_(True)
    trimmed, lengths = arch.tower_states(model, features, feats["attention_mask"])
    assert lengths.tolist() == out_lengths.tolist() and trimmed.shape[1] < full.shape[1] // 4
    for i, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(trimmed[i, :n], full[i, :n], rtol=1e-5, atol=1e-5)
    trimmed[0, : lengths[0]].sum().backward()
    assert features.grad is not None and features.grad[0].abs().sum() > 0


def test_out_of_memory_halves_batch(loaded, speech_like, monkeypatch):
    model, processor = loaded
    examples = _examples(speech_like)
    expected = Translator(model, processor, generation=_gen(batch_size=1), progress=False).translate(examples)
    translator = Translator(model, processor, generation=_gen(batch_size=4), progress=False)
    real = translator._generate_batch

    def flaky(batch, cache, kwargs):
        if len(batch) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(batch, cache, kwargs)

    monkeypatch.setattr(translator, "_generate_batch", flaky)
    stats = RunStats()
    assert translator.translate(examples, stats=stats) == expected
    assert translator.batch_size == 1 and stats.final_batch_size == 1 and stats.n_segments == 5


def test_out_of_memory_at_batch_one_is_a_clear_error(loaded, speech_like, monkeypatch):
    model, processor = loaded
    translator = Translator(model, processor, generation=_gen(batch_size=1), progress=False)

    def oom(*a, **k):
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(translator, "_generate_batch", oom)
    with pytest.raises(StcompressError, match="generation.batch_size: out of GPU memory even at batch size 1"):
        translator.translate(_examples(speech_like, seconds=(1.0,)))


def test_other_runtime_errors_are_not_swallowed(loaded, speech_like, monkeypatch):
    model, processor = loaded
    translator = Translator(model, processor, generation=_gen(), progress=False)
    monkeypatch.setattr(translator, "_generate_batch", lambda *a: (_ for _ in ()).throw(RuntimeError("shape mismatch")))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        translator.translate(_examples(speech_like, seconds=(1.0,)))


def test_run_stats_count_generated_tokens(loaded, speech_like):
    model, processor = loaded
    examples = _examples(speech_like, seconds=(1.0, 2.0))
    stats = RunStats()
    hyps = Translator(model, processor, generation=_gen(), progress=False).translate(examples, stats=stats)
    report = stats.to_dict()
    assert report["segments"] == 2 and report["generated_tokens"] == sum(h.n_tokens for h in hyps)
    assert all(1 <= h.n_tokens <= 12 for h in hyps)
    assert np.isfinite(report["segments_per_s"])


@pytest.mark.parametrize("batch_size", [1, 3])
def test_static_cache_decoding_equals_transformers_steps(loaded, speech_like, batch_size):
    model, processor = loaded
    assert static_decode.supported(model)  # else this would compare transformers with itself
    examples = _examples(speech_like)
    fast = Translator(model, processor, generation=_gen(batch_size=batch_size, max_new_tokens=16), progress=False)
    slow = Translator(model, processor, generation=_gen(batch_size=batch_size, max_new_tokens=16, static_cache=False),
                      progress=False)
    assert fast.translate(examples) == slow.translate(examples)


def test_static_cache_stops_at_end_of_turn(loaded, speech_like):
    """Rows that end early are padded after their end-of-turn; decoding stops once all have ended."""
    model, processor = loaded
    assert static_decode.supported(model)
    examples = _examples(speech_like, seconds=(1.0, 2.0))
    fast = Translator(model, processor, generation=_gen(), progress=False)
    slow = Translator(model, processor, generation=_gen(static_cache=False), progress=False)
    cache = fast.encode(examples)
    embeds, mask = fast.build_inputs(examples, cache)
    free = slow._greedy(embeds, mask, 12, {151645}, 151643)
    stop = int(free[0, 2])  # row 0 "ends" at its third token; row 1 keeps going unless it emits it too
    a = fast._greedy(embeds, mask, 12, {stop}, 151643)
    b = slow._greedy(embeds, mask, 12, {stop}, 151643)
    assert torch.equal(a, b)
    assert int(a[0, 2]) == stop and bool((a[0, 3:] == 151643).all())
