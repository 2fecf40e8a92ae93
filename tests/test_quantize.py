"""Export formats beyond NF4 (stcompress.quantize): int8, hqq with bits per component, their checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from packaging.version import Version

from stcompress.artifacts import read_manifest
from stcompress.config import DataConfig, ExportConfig, load_config
from stcompress.errors import ConfigError, ModelError
from stcompress.metrics.efficiency import component_bytes, safetensors_header, weight_bytes
from stcompress.model import arch
from stcompress.quantize import component_bits, parse_bits
from stcompress.sizes import predict
from stcompress.stages import export

TF5 = Version(transformers.__version__) >= Version("5")


def _cfg(tmp_path: Path, input: Path, **kw) -> ExportConfig:
    fields = {"dtype": "bfloat16", "device": "cpu", "check_segments": 2, "check_max_new_tokens": 6, "data": DataConfig(limit=2)}
    return ExportConfig(output=str(tmp_path / "export"), input=str(input), **(fields | kw))


def test_bits_parse_defaults_and_problems():
    assert parse_bits("decoder=3, lm_head=8,embed=16") == {"decoder_layers": 3, "lm_head": 8, "embed_tokens": 16}
    assert component_bits("nf4", "", ("lm_head",)) == {
        "audio_tower": 4, "projector": 4, "decoder_layers": 4, "lm_head": 16, "embed_tokens": 16}
    assert component_bits("hqq", "decoder_layers=2", ())["decoder_layers"] == 2
    assert set(component_bits("none", "", ()).values()) == {16}
    cases = {
        "decoder_layers=3": ("nf4", "decoder_layers=3 is not stored by quantize nf4"),
        "embed_tokens=4": ("hqq", "embeddings stay in the export dtype"),
        "lm_head:8": ("hqq", "'lm_head:8' is not COMPONENT=BITS"),
        "norm=4": ("int8", "'norm=4' is not COMPONENT=BITS"),
    }
    for bits, (fmt, message) in cases.items():
        with pytest.raises(ConfigError, match=message):
            load_config(ExportConfig, {"input": "x", "quantize": fmt, "bits": bits})
    with pytest.raises(ConfigError, match="group_size: 48"):
        load_config(ExportConfig, {"input": "x", "quantize": "hqq", "group_size": 48})


def _dtypes(out: Path) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for name, entry in safetensors_header(out / "model.safetensors").items():
        found.setdefault(arch.component_of(name), set()).add(entry["dtype"])
    return found


def test_int8_export_reloads_with_plain_from_pretrained(tmp_path, tiny_model_dir):
    out = export.run(_cfg(tmp_path, tiny_model_dir, quantize="int8"), progress=False)
    dtypes = _dtypes(out)
    assert "I8" in dtypes["decoder_layers"] and "I8" in dtypes["audio_tower"] and "I8" in dtypes["projector"]
    assert dtypes["lm_head"] == {"BF16"} and dtypes["embed_tokens"] == {"BF16"}  # lm_head kept by default
    manifest = read_manifest(out)
    assert manifest["reload_check"]["identical"] and manifest["reload_check"]["token_agreement"] == 1.0
    assert manifest["model"]["precision"]["bits"]["decoder_layers"] == 8
    full = transformers.Qwen2AudioForConditionalGeneration.from_pretrained(str(tiny_model_dir))
    assert manifest["model"]["parameters"] == sum(p.numel() for p in full.parameters())  # true count, not int8 storage
    sizes = component_bytes(out)
    assert sum(sizes["components"].values()) == sizes["total"] == weight_bytes(out)
    _predicted_exactly(out, "int8", "", "bfloat16")
    reloaded = transformers.Qwen2AudioForConditionalGeneration.from_pretrained(str(out))
    assert type(arch.decoder_layers(reloaded)[0].mlp.up_proj).__name__ == "Linear8bitLt"
    card = (out / "README.md").read_text()
    assert "## Bits per component" in card and "| decoder_layers | 8 | int8 (bitsandbytes LLM.int8) |" in card


@pytest.mark.skipif(not TF5, reason="the refusal is for transformers 5.x; 4.57 exports HQQ (next test)")
def test_hqq_refused_on_transformers_5(tmp_path, tiny_model_dir):
    with pytest.raises(ModelError, match="quantize: hqq needs transformers 4.5x.*quantize: int8 / nf4"):
        export.run(_cfg(tmp_path, tiny_model_dir, quantize="hqq"), progress=False)
    assert not (tmp_path / "export").exists()


@pytest.mark.skipif(TF5, reason="transformers 5.x cannot reload HQQ checkpoints (refused: previous test)")
def test_hqq_mixed_bits_per_component(tmp_path, tiny_model_dir):
    bits = "decoder_layers=3,lm_head=8,audio_tower=4,projector=16"
    out = export.run(_cfg(tmp_path, tiny_model_dir, quantize="hqq", bits=bits), progress=False)
    header = safetensors_header(out / "model.safetensors")
    packed = {n.removesuffix(".W_q"): e for n, e in header.items() if n.endswith(".W_q")}
    by_component: dict[str, set[str]] = {}
    for name, entry in packed.items():
        by_component.setdefault(arch.component_of(name + ".weight"), set()).add(entry["dtype"])
    # hqq packs 3-bit ten to an int32, 4- and 8-bit in uint8
    assert by_component == {"decoder_layers": {"I32"}, "lm_head": {"U8"}, "audio_tower": {"U8"}}
    assert header["multi_modal_projector.linear.weight"]["dtype"] == "BF16"
    assert header["language_model.model.embed_tokens.weight"]["dtype"] == "BF16"
    manifest = read_manifest(out)
    assert manifest["reload_check"]["identical"]
    reloaded = transformers.Qwen2AudioForConditionalGeneration.from_pretrained(str(out), dtype=torch.float32)
    nbits = {c: {m.meta["nbits"] for n, m in reloaded.named_modules() if type(m).__name__ == "HQQLinear"
                 and arch.component_of(n + ".weight") == c} for c in ("decoder_layers", "lm_head", "audio_tower")}
    assert nbits == {"decoder_layers": {3}, "lm_head": {8}, "audio_tower": {4}}
    assert type(arch.projector(reloaded).linear).__name__ == "Linear"
    assert sizes_shrink(out, tiny_model_dir)
    _predicted_exactly(out, "hqq", bits, "bfloat16")


def _predicted_exactly(out: Path, fmt: str, bits: str, dtype: str) -> None:
    """stcompress.sizes predicts every component's tensor bytes exactly (headers are not predicted)."""
    config = transformers.AutoConfig.from_pretrained(str(out))
    predicted = predict(config, fmt, component_bits(fmt, bits, ("lm_head",)), dtype)
    measured = component_bytes(out)["components"]
    assert {c: predicted[c] for c in arch.COMPONENTS} == {c: measured[c] for c in arch.COMPONENTS}
    assert 0 < measured["overhead"] < 0.01 * predicted["total"]


def sizes_shrink(out: Path, full: Path) -> bool:
    """3-bit decoder weights take under a quarter of their bf16 size (fp32 source: under an eighth)."""
    return component_bytes(out)["components"]["decoder_layers"] < component_bytes(full)["components"]["decoder_layers"] / 4


def test_int8_model_logs_bitsandbytes_per_matmul_warning_once(tmp_path, tiny_model_dir, caplog):
    """LLM.int8 warns about its input cast on every matmul; loading an int8 model through us lets
    each distinct message through once (the testbed sweep logged it 34,804 times)."""
    import logging

    from stcompress.config import ModelConfig
    from stcompress.model.load import load_model

    out = export.run(_cfg(tmp_path, tiny_model_dir, quantize="int8"), progress=False)
    loaded = load_model(ModelConfig(path=str(out), device="cpu"))
    assert getattr(loaded.model, "is_loaded_in_8bit", False)
    bnb = logging.getLogger("bitsandbytes.autograd._functions")
    cast = f"MatMul8bitLt: inputs will be cast ({tmp_path.name})"  # unique: the filter lives for the process
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            bnb.warning(cast)
        bnb.warning("%s, another", cast)
    assert [r.getMessage() for r in caplog.records if r.name == bnb.name] == [cast, f"{cast}, another"]
