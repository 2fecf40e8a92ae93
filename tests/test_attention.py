"""Decoders with one KV head run SDPA with materialised K/V (stcompress.model.attention).

The CUDA fault itself needs a GPU (benchmarks/testbed/padding_check.py shows it); here: the switch
happens exactly where it should, the switched attention is what runs, it computes what plain sdpa
and each row alone compute, and nothing of it reaches a saved model.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from stcompress.config import ModelConfig
from stcompress.model import arch, attention
from stcompress.model.load import load_model
from stcompress.model.tiny import tiny_model_cache

MQA = dict(text_model_type="gemma3_text", text_layers=3, sliding_window=8, num_heads=4, num_kv_heads=1)


@pytest.fixture(scope="module")
def mqa_dir():
    return tiny_model_cache(**MQA)


def _padded_batch(model, widths=(33, 20, 7)):
    hidden = arch.text_config(model).hidden_size
    w = max(widths)
    mask = torch.zeros(len(widths), w, dtype=torch.long)
    for i, n in enumerate(widths):
        mask[i, w - n :] = 1
    gen = torch.Generator().manual_seed(0)
    return torch.randn(len(widths), w, hidden, generator=gen), mask, arch.mask_positions(mask)


def _last_hidden(model, embeds, mask, positions):
    with torch.no_grad():
        return arch.text_model(model)(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).last_hidden_state


def test_single_kv_head_decoder_is_switched_and_computes_as_plain_sdpa(mqa_dir, monkeypatch):
    model = load_model(ModelConfig(path=str(mqa_dir), dtype="float32")).model
    config = arch.text_config(model)
    assert config.num_key_value_heads == 1 and config._attn_implementation == attention.NAME

    embeds, mask, positions = _padded_batch(model)
    calls = []
    real = transformers.AttentionInterface._global_mapping[attention.NAME]
    monkeypatch.setitem(transformers.AttentionInterface._global_mapping, attention.NAME,
                        lambda *a, **k: calls.append(a[2].stride()) or real(*a, **k))
    switched = _last_hidden(model, embeds, mask, positions)
    assert len(calls) == config.num_hidden_layers  # every layer went through it
    monkeypatch.undo()

    config._attn_implementation = "sdpa"
    plain = _last_hidden(model, embeds, mask, positions)
    assert torch.equal(switched, plain)  # the same arithmetic, only K/V's memory layout differs
    config._attn_implementation = attention.NAME
    for i in range(mask.shape[0]):  # and each row as if alone (left padding changes nothing)
        start = int((mask[i] == 0).sum())
        alone = _last_hidden(model, embeds[i : i + 1, start:], mask[i : i + 1, start:], positions[i : i + 1, start:])
        torch.testing.assert_close(switched[i, -1], alone[0, -1], rtol=1e-5, atol=1e-5)


def test_keys_reach_sdpa_materialised(mqa_dir, monkeypatch):
    """The fault needs a stride-0 head dimension; what SDPA receives has none."""
    model = load_model(ModelConfig(path=str(mqa_dir), dtype="float32")).model
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: seen.append((k.stride(1), v.stride(1), k.is_contiguous())) or sdpa(q, k, v, **kw))
    _last_hidden(model, *_padded_batch(model))
    assert seen and all(ks != 0 and vs != 0 and contiguous for ks, vs, contiguous in seen)

    arch.text_config(model)._attn_implementation = "sdpa"  # transformers' own path: the stride-0 view
    seen.clear()
    _last_hidden(model, *_padded_batch(model))
    assert seen and all(ks == 0 for ks, _, _ in seen)


def test_saved_model_keeps_plain_sdpa_and_reloads(mqa_dir, tmp_path):
    loaded = load_model(ModelConfig(path=str(mqa_dir), dtype="float32"))
    assert arch.text_config(loaded.model)._attn_implementation == attention.NAME
    loaded.model.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert attention.NAME not in json.dumps(config)
    plain = transformers.Qwen2AudioForConditionalGeneration.from_pretrained(str(tmp_path / "saved"), dtype=torch.float32).eval()
    assert arch.text_config(plain)._attn_implementation == "sdpa"
    batch = _padded_batch(plain)
    assert torch.equal(_last_hidden(plain, *batch), _last_hidden(loaded.model, *batch))


def test_decoders_with_several_kv_heads_or_other_attention_are_left_alone(mqa_dir):
    qwen = load_model(ModelConfig(path=str(tiny_model_cache(num_kv_heads=2)), dtype="float32")).model
    assert arch.text_config(qwen).num_key_value_heads == 2 and arch.text_config(qwen)._attn_implementation == "sdpa"
    eager = load_model(ModelConfig(path=str(mqa_dir), dtype="float32", attn_implementation="eager")).model
    assert arch.text_config(eager)._attn_implementation == "eager"
    assert not attention.materialise_single_kv(eager)
