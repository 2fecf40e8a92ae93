"""model/load.py: damaged checkpoints fail in one line naming the file; quantized exports load in
their own dtype."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from stcompress.config import DataConfig, ExportConfig, GenerationConfig, ModelConfig
from stcompress.data.example import Example
from stcompress.errors import ModelError
from stcompress.model.load import load_model
from stcompress.stages import export
from stcompress.translate import Translator


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    return copy


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[: len(b) // 2], r"model\.safetensors is truncated .*download or copy stopped early or the disk filled up"),
    (lambda b: b"", r"model\.safetensors is truncated \(0 of 8 bytes"),
    (lambda b: b"<html>404 not found</html>" * 4, r"model\.safetensors is not a valid safetensors file .*another format"),
], ids=["half", "empty", "html"])
def test_damaged_weights_name_the_file_and_cause(model_copy, damage, message):
    weights = model_copy / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    with pytest.raises(ModelError, match=message) as err:
        load_model(ModelConfig(path=str(model_copy), device="cpu"))
    assert "\n" not in str(err.value) and str(weights) in str(err.value)


def test_missing_shard_and_bad_config_are_one_line(model_copy):
    (model_copy / "model.safetensors").rename(model_copy / "model-00001-of-00002.safetensors")
    shards = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (model_copy / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": shards}))
    with pytest.raises(ModelError, match=r"model-00002-of-00002\.safetensors is missing"):
        load_model(ModelConfig(path=str(model_copy), device="cpu"))
    (model_copy / "model.safetensors.index.json").unlink()
    (model_copy / "model-00001-of-00002.safetensors").rename(model_copy / "model.safetensors")
    (model_copy / "config.json").write_text('{"model_type": "qwen2_audio", ')
    with pytest.raises(ModelError, match=r"config\.json.*not a valid JSON"):
        load_model(ModelConfig(path=str(model_copy), device="cpu"))


def test_cli_prints_one_line_for_a_truncated_checkpoint(model_copy, tmp_path):
    weights = model_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    out = subprocess.run([sys.executable, "-m", "stcompress", "translate", "--model.path", str(model_copy),
                          "--model.device", "cpu", "--output", str(tmp_path / "t"), "-q"], capture_output=True, text=True)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "model.safetensors is truncated" in out.stderr


def test_nf4_export_made_on_cpu_loads_with_default_dtype(tiny_model_dir, tmp_path, speech_like):
    pytest.importorskip("bitsandbytes")
    out = export.run(ExportConfig(output=str(tmp_path / "nf4"), input=str(tiny_model_dir), dtype="bfloat16", device="cpu",
                                  quantize="nf4", check_segments=1, check_max_new_tokens=4, data=DataConfig(limit=1)),
                     progress=False)
    loaded = load_model(ModelConfig(path=str(out), device="cpu"))  # dtype auto: fp32 on CPU for plain models
    hyps = Translator(loaded.model, loaded.processor, generation=GenerationConfig(max_new_tokens=4), progress=False).translate(
        [Example(id="a", audio=speech_like(1.0), target_lang="de")])
    assert hyps[0].n_tokens >= 1 and str(loaded.dtype) == "torch.bfloat16"
    with pytest.raises(ModelError, match=r"model\.dtype: .* saved in bfloat16; it cannot be loaded in float32"):
        load_model(ModelConfig(path=str(out), device="cpu", dtype="float32"))
