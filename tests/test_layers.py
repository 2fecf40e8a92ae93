"""Decoder-layer surgery: views equal physical pruning, and everything is restored."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

from stcompress.config import GenerationConfig
from stcompress.data.example import Example
from stcompress.errors import StcompressError
from stcompress.model import arch
from stcompress.model.layers import decoder_view, remove_decoder_layers, remove_encoder_layers
from stcompress.translate import Translator


@pytest.fixture()
def model_and_processor(tiny_model_dir):
    model = transformers.Qwen2AudioForConditionalGeneration.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    return model.eval(), transformers.AutoProcessor.from_pretrained(str(tiny_model_dir))


def _examples(speech_like):
    return [Example(id=f"e{i}", audio=speech_like(1.0 + i, seed=i), target_lang="de") for i in range(3)]


def _translate(model, processor, examples, cache=None):
    gen = GenerationConfig(max_new_tokens=8, batch_size=2)
    return Translator(model, processor, generation=gen, progress=False).translate(examples, cache=cache)


def test_view_equals_physically_pruned_copy(model_and_processor, speech_like):
    model, processor = model_and_processor
    examples = _examples(speech_like)
    translator = Translator(model, processor, generation=GenerationConfig(max_new_tokens=8), progress=False)
    cache = translator.encode(examples)
    with decoder_view(model, keep=[0, 2, 3]):
        assert arch.num_decoder_layers(model) == 3
        viewed = _translate(model, processor, examples, cache)
    pruned = copy.deepcopy(model)
    assert remove_decoder_layers(pruned, [1]) == [0, 2, 3]
    physical = _translate(pruned, processor, examples)
    assert viewed == physical
    assert viewed != _translate(model, processor, examples, cache)  # layer 1 does matter


def test_view_restores_layers_indices_and_config(model_and_processor):
    model, _ = model_and_processor
    layers = list(arch.decoder_layers(model))
    config = arch.text_config(model)
    before = (config.num_hidden_layers, list(getattr(config, "layer_types", None) or []))
    with pytest.raises(RuntimeError, match="boom"):
        with decoder_view(model, keep=[3, 0]):
            assert [l.self_attn.layer_idx for l in arch.decoder_layers(model)] == [0, 1]
            assert arch.decoder_layers(model)[0] is layers[0] and config.num_hidden_layers == 2
            raise RuntimeError("boom")
    assert list(arch.decoder_layers(model)) == layers
    assert [l.self_attn.layer_idx for l in layers] == [0, 1, 2, 3]
    assert (config.num_hidden_layers, list(getattr(config, "layer_types", None) or [])) == before


def test_removal_updates_config_for_reload(model_and_processor, tmp_path):
    model, processor = model_and_processor
    remove_decoder_layers(model, [1, 2])
    config = arch.text_config(model)
    assert config.num_hidden_layers == 2
    if getattr(config, "layer_types", None) is not None:
        assert len(config.layer_types) == 2
    model.save_pretrained(tmp_path)
    again = transformers.Qwen2AudioForConditionalGeneration.from_pretrained(str(tmp_path), dtype=torch.float32)
    assert arch.num_decoder_layers(again) == 2
    for a, b in zip(arch.decoder_layers(model), arch.decoder_layers(again)):
        torch.testing.assert_close(a.mlp.down_proj.weight, b.mlp.down_proj.weight)


def test_encoder_layer_removal(model_and_processor):
    model, _ = model_and_processor
    assert remove_encoder_layers(model, [0]) == [1]
    assert len(arch.audio_tower(model).layers) == 1 and model.config.audio_config.encoder_layers == 1


@pytest.mark.parametrize(
    "remove, message",
    [([7], "layer index 7 is out of range; the decoder has layers 0..3"), ([1, 1], "layer 1 is listed twice"),
     ([0, 1, 2, 3], "leaves no model")],
)
def test_bad_layer_lists(model_and_processor, remove, message):
    model, _ = model_and_processor
    with pytest.raises(StcompressError, match=message):
        remove_decoder_layers(model, remove)
    assert arch.num_decoder_layers(model) == 4


def test_teacher_forced_difference_detects_a_broken_save(model_and_processor, speech_like):
    """The GPU fallback of the reload check: zero for the same weights, large for a damaged copy."""
    import copy as _copy

    from stcompress.model.save import GPU_LOGIT_TOLERANCE, teacher_forced_difference

    model, processor = model_and_processor
    examples = _examples(speech_like)[:2]
    same = teacher_forced_difference(model, _copy.deepcopy(model), processor, examples, ["Hallo Welt", "Guten Tag"])
    assert same["relative_logit_difference"] == 0.0 and same["argmax_agreement"] == 1.0
    broken = _copy.deepcopy(model)
    with torch.no_grad():
        arch.decoder_layers(broken)[1].mlp.down_proj.weight.zero_()
    bad = teacher_forced_difference(model, broken, processor, examples, ["Hallo Welt", "Guten Tag"])
    assert bad["relative_logit_difference"] > 10 * GPU_LOGIT_TOLERANCE
