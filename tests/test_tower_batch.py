"""Batched audio tower (`tower_outputs(batch=N)`, the CUDA default): clips of the same 1 s length
bucket run together, without padding to 30 s, and a clip's output does not depend on its batch mates."""

from __future__ import annotations

import pytest
import torch
import transformers

from stcompress.model import arch, tower_memo

SECONDS = (0.7, 2.3, 1.1, 3.0, 1.6, 1.15, 2.35)  # 1.1/1.15/1.6 and 2.3/2.35 share buckets


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    model = transformers.Qwen2AudioForConditionalGeneration.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    return model.eval(), transformers.AutoProcessor.from_pretrained(str(tiny_model_dir))


def _clips(speech_like):
    return [speech_like(s, seed=30 + i) for i, s in enumerate(SECONDS)]


def test_batched_output_is_the_same_in_any_grouping(loaded, speech_like, monkeypatch):
    model, processor = loaded
    extractor = processor.feature_extractor
    clips = _clips(speech_like)
    calls = []
    real = arch.tower_states
    monkeypatch.setattr(arch, "tower_states", lambda *a, **k: calls.append((len(a[1]), k["frames"])) or real(*a, **k))
    together = tower_memo.tower_outputs(model, extractor, clips, remember=False, batch=4)
    # 4 buckets (100, 200, 300, 400 frames; 1.6 s -> 200), every call padded to 4 rows
    assert sorted(calls) == [(4, 100), (4, 200), (4, 300), (4, 400)] and len(together) == len(clips)
    apart = [tower_memo.tower_outputs(model, extractor, [c], remember=False, batch=4)[0] for c in clips]
    shuffled = tower_memo.tower_outputs(model, extractor, clips[::-1], remember=False, batch=4)[::-1]
    two = tower_memo.tower_outputs(model, extractor, clips, remember=False, batch=2)
    for a, b, c in zip(together, apart, shuffled):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert all(a.shape == b.shape for a, b in zip(together, two))


def test_batched_output_equals_transformers_encoder_and_the_per_clip_path(loaded, speech_like):
    model, processor = loaded
    extractor = processor.feature_extractor
    clips = _clips(speech_like)
    batched = tower_memo.tower_outputs(model, extractor, clips, remember=False, batch=4)
    alone = tower_memo.tower_outputs(model, extractor, clips, remember=False, batch=1)
    feats = extractor(clips, sampling_rate=16000, padding="max_length", return_attention_mask=True, return_tensors="pt")
    tower = arch.audio_tower(model)
    conv_lengths, out_lengths = tower._get_feat_extract_output_lengths(feats["attention_mask"].sum(-1))
    width = tower.config.max_source_positions
    pad = torch.arange(width)[None, :] >= conv_lengths[:, None]
    mask = torch.zeros(len(clips), 1, width, width).masked_fill_(pad[:, None, None, :], torch.finfo(torch.float32).min)
    with torch.no_grad():
        full = tower(feats["input_features"], attention_mask=mask).last_hidden_state
    for i, n in enumerate(out_lengths.tolist()):
        assert batched[i].shape[0] == n
        torch.testing.assert_close(batched[i], full[i, :n], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(batched[i], alone[i], rtol=1e-5, atol=1e-5)


def test_batched_memo_hits_equal_fresh_batched_output(loaded, speech_like):
    model, processor = loaded
    extractor = processor.feature_extractor
    clips = _clips(speech_like)
    first = tower_memo.tower_outputs(model, extractor, clips[:4], batch=4)
    mixed = tower_memo.tower_outputs(model, extractor, clips, batch=4)  # 4 hits, 3 computed
    assert tower_memo.MEMO.hits == 4
    fresh = tower_memo.tower_outputs(model, extractor, clips, remember=False, batch=4)
    assert all(torch.equal(a, b) for a, b in zip(first, mixed[:4]))
    assert all(torch.equal(a, b) for a, b in zip(mixed, fresh))


def test_tower_frames_never_cut_into_a_clip(loaded, speech_like):
    model, processor = loaded
    feats = processor.feature_extractor([speech_like(2.0)], sampling_rate=16000, padding="max_length",
                                        return_attention_mask=True, return_tensors="pt")
    assert arch.tower_frames(200, 100) == 300 and arch.tower_frames(2995, 100) == 3000
    with pytest.raises(ValueError, match="frames=200 cuts into the longest clip"):
        arch.tower_states(model, feats["input_features"], feats["attention_mask"], frames=200)


def test_default_batch_is_one_clip_on_cpu(loaded, monkeypatch):
    model, _ = loaded
    monkeypatch.delenv(tower_memo.BATCH_ENV, raising=False)
    assert tower_memo.tower_batch(model) == 1
    monkeypatch.setenv(tower_memo.BATCH_ENV, "8")
    assert tower_memo.tower_batch(model) == 8
