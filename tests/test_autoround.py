"""The calibrated 4-bit export (quantize autoround: auto-round -> compressed-tensors), on CPU.

A tiny Qwen2-Audio 128 wide (group size 128 needs 128-wide inputs), calibrated on the built-in
data's audio through the inference prompt, reloaded with plain from_pretrained on 4.57 and 5.x.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import transformers

from stcompress import calibrated
from stcompress.artifacts import read_manifest
from stcompress.config import DataConfig, ExportConfig, ModelConfig, load_config
from stcompress.data.sources import load_examples
from stcompress.errors import ConfigError, DataError
from stcompress.metrics.efficiency import component_bytes, safetensors_header
from stcompress.model import arch
from stcompress.model.load import load_model
from stcompress.prompt import PromptBuilder
from stcompress.quantize import component_bits
from stcompress.sizes import predict
from stcompress.stages import export

pytest.importorskip("auto_round", reason="the quant extra (auto-round) is not installed")


@pytest.fixture(scope="module")
def wide_model_dir() -> Path:
    from stcompress.model.tiny import tiny_model_cache

    return tiny_model_cache(text_layers=2, hidden_size=128, intermediate_size=256)


def _cfg(tmp_path: Path, input: Path, **kw) -> ExportConfig:
    fields = {"dtype": "bfloat16", "device": "cpu", "check_segments": 2, "check_max_new_tokens": 6,
              "data": DataConfig(limit=2, test_size=4), "quantize": "autoround", "calibration_samples": 3,
              "calibration_iters": 2}
    return ExportConfig(output=str(tmp_path / "export"), input=str(input), **(fields | kw))


def test_calibration_pairs_are_the_training_encoding_with_audio(wide_model_dir):
    """Each calibration input is the inference prompt (with the clip's audio tokens) + reference,
    with that clip's mel features: what the decoder sees when it translates."""
    cfg = ExportConfig(input="x", quantize="autoround", calibration_samples=3, data=DataConfig(test_size=4))
    examples = calibrated.calibration_examples(cfg)
    assert len(examples) == 3 and calibrated.calibration_data(cfg).subset == "train"
    test_ids = {e.id for e in load_examples(dataclasses.replace(cfg.data, subset="test"), on_error="fail").examples}
    assert not test_ids & {e.id for e in examples}  # the train part, never the test set
    processor = transformers.AutoProcessor.from_pretrained(str(wide_model_dir))
    batches = calibrated.calibration_batches(processor, examples, cfg)
    builder = PromptBuilder(processor, cfg.prompt)
    assert len(batches) == 3
    for batch, ex in zip(batches, examples):
        assert set(batch) == {"input_ids", "attention_mask", "input_features", "feature_attention_mask"}
        n_audio = int((batch["input_ids"] == builder.rendered(ex.target_lang).audio_token_id).sum())
        ids, _ = builder.training_ids(ex.target_lang, n_audio, ex.references[0])
        assert batch["input_ids"][0].tolist() == ids and n_audio > 10
        assert builder.render(ex.target_lang).split("<|AUDIO|>")[0] in processor.tokenizer.decode(ids)
        assert 0 < int(batch["feature_attention_mask"].sum()) <= batch["input_features"].shape[-1]


def test_autoround_export_reloads_with_plain_from_pretrained(tmp_path, wide_model_dir):
    out = export.run(_cfg(tmp_path, wide_model_dir), progress=False)
    header = safetensors_header(out / "model.safetensors")
    packed = {n for n in header if n.endswith(".weight_packed")}
    assert packed and {arch.component_of(n) for n in packed} == {"decoder_layers"}
    assert len(packed) == 2 * 7  # every linear of both decoder layers
    up = next(n for n in packed if "layers.0.mlp.up_proj" in n)
    assert header[up]["dtype"] == "I32" and header[up]["shape"] == [256, 128 // 8]  # eight 4-bit codes an int32
    assert header[up.replace("packed", "scale")]["shape"] == [256, 1]  # one scale per 128 inputs
    for component in ("lm_head", "embed_tokens", "audio_tower", "projector"):
        assert {e["dtype"] for n, e in header.items() if arch.component_of(n) == component} == {"BF16"}, component
    predicted = predict(transformers.AutoConfig.from_pretrained(str(wide_model_dir)), "autoround",
                        component_bits("autoround", "", ("lm_head",)), "bfloat16")
    measured = component_bytes(out)["components"]
    assert {c: predicted[c] for c in arch.COMPONENTS} == {c: measured[c] for c in arch.COMPONENTS}
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["config_groups"]["group_0"]["weights"]["group_size"] == 128
    assert all(p.startswith("re:") for p in q["ignore"])  # kept components named for both module layouts

    manifest = read_manifest(out)
    check = manifest["reload_check"]
    assert check["identical"] and check["token_agreement"] == 1.0 and check["chrf"] == 100.0
    assert {"token_agreement", "chrf", "identical_segments"} <= set(check["vs_full_precision"])
    cal = manifest["calibration"]
    assert cal["samples"] == 3 and cal["subset"] == "train" and cal["audio_tokens"] > 30 and cal["iters"] == 2
    full = transformers.Qwen2AudioForConditionalGeneration.from_pretrained(str(wide_model_dir))
    assert manifest["model"]["parameters"] == sum(p.numel() for p in full.parameters())
    assert manifest["model"]["precision"]["bits"] == {"audio_tower": 16, "projector": 16, "decoder_layers": 4,
                                                      "lm_head": 16, "embed_tokens": 16}
    card = (out / "README.md").read_text()
    assert "| decoder_layers | 4 | 4-bit AutoRound (compressed-tensors), group 128 |" in card
    assert "compressed-tensors" in card and "| lm_head | bfloat16 | bfloat16 |" in card

    # plain from_pretrained (the library's own decompression on first forward) == stcompress's load
    examples = calibrated.calibration_examples(_cfg(tmp_path, wide_model_dir))
    processor = transformers.AutoProcessor.from_pretrained(str(out))
    batch = calibrated.calibration_batches(processor, examples[:1], _cfg(tmp_path, wide_model_dir))[0]
    # dtype given: without it 4.57 loads compressed-tensors checkpoints in float16 (5.x: the saved bf16)
    plain = transformers.Qwen2AudioForConditionalGeneration.from_pretrained(str(out), dtype=torch.bfloat16)
    ours = load_model(ModelConfig(path=str(out), device="cpu", dtype="bfloat16")).model
    with torch.no_grad():
        a, b = plain(**batch).logits, ours(**batch).logits
        f = full.to(torch.bfloat16)(**batch).logits
    assert torch.equal(a, b)
    assert (a - f).abs().max() > 1e-2  # the decoder really is 4-bit


def test_autoround_bad_options_refused_before_loading(tmp_path, wide_model_dir):
    cases = {
        "audio_tower=4": ("bits", "quantize autoround calibrates the decoder layers only"),
        "decoder_layers=3": ("bits", "decoder_layers=3 is not stored by quantize autoround"),
    }
    for bits, (_, message) in cases.items():
        with pytest.raises(ConfigError, match=message):
            load_config(ExportConfig, {"input": "x", "quantize": "autoround", "bits": bits})
    with pytest.raises(ConfigError, match="group_size: 96 is not one of 32, 64, 128"):
        load_config(ExportConfig, {"input": "x", "quantize": "autoround", "group_size": 96})
    with pytest.raises(ConfigError, match="calibration_samples: must be at least 1"):
        load_config(ExportConfig, {"input": "x", "quantize": "autoround", "calibration_samples": 0})
    # the built-in data has 12 rows: the default test_size 100 leaves no training part to calibrate on
    with pytest.raises(DataError, match="no training rows"):
        export.run(_cfg(tmp_path, wide_model_dir, data=DataConfig(limit=2)), progress=False)
    assert not (tmp_path / "export").exists()
