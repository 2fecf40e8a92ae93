"""`stcompress export`: LoRA merge in full precision, NF4 serialisation, sizes, reload, bad inputs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from stcompress import cli
from stcompress.artifacts import read_manifest
from stcompress.config import DataConfig, ExportConfig, ModelConfig, load_config
from stcompress.errors import ConfigError, ModelError
from stcompress.metrics.efficiency import component_bytes, safetensors_header, weight_bytes
from stcompress.model import arch
from stcompress.model.load import load_model
from stcompress.stages import export

QUANT_STATE = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".quant_state.")
PROMPT = (
    "<|im_start|>system\nYou are a professional translator.<|im_end|>\n<|im_start|>user\n"
    "Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\nTranslate the English speech into German:<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def _cfg(tmp_path: Path, input: Path, name: str = "export", **kw) -> ExportConfig:
    fields = {"dtype": "float32", "device": "cpu", "check_segments": 2, "check_max_new_tokens": 6, "data": DataConfig(limit=2)}
    return ExportConfig(output=str(tmp_path / name), input=str(input), **(fields | kw))


def _logits(model, processor, audio) -> torch.Tensor:
    inputs = processor(text=PROMPT, audio=[audio], sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        return model(**inputs).logits


def _load(directory) -> transformers.Qwen2AudioForConditionalGeneration:
    return transformers.Qwen2AudioForConditionalGeneration.from_pretrained(str(directory)).eval()


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory):
    """A finetune-style LoRA output on a 'pruned' base, and the logits of base + adapter in memory."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("upstream")
    pruned = root / "pruned"  # the tiny model standing in for a prune output (its manifest is what matters)
    pruned.mkdir()
    for f in Path(tiny_model_dir).iterdir():
        os.symlink(f, pruned / f.name)
    (pruned / "manifest.json").write_text(json.dumps({
        "stage": "prune", "removed_layers": [2], "layer_map": [0, 1, 3, 4], "base_model": "Qwen/Qwen2-Audio-7B-Instruct",
    }))
    base = _load(pruned)
    processor = transformers.AutoProcessor.from_pretrained(str(pruned))
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(base, lora).eval()
    ft = root / "finetune"
    model.save_pretrained(str(ft / "adapter"))
    (ft / "manifest.json").write_text(json.dumps({
        "stage": "finetune", "mode": "lora", "base_model": str(pruned),
        "config": {"mode": "lora",
                   "data": {"dataset": "ymoslem/ACL-6060", "split": "dev+eval", "subset": "train", "target_lang": "de"}},
    }))
    audio = (0.1 * np.random.default_rng(5).standard_normal(48000)).astype(np.float32)
    with model.disable_adapter():
        base_logits = _logits(model, processor, audio)
    return ft, pruned, audio, _logits(model, processor, audio), base_logits


def test_lora_merge_export(lora_run, tmp_path):
    ft, pruned, audio, expected, base_logits = lora_run
    out = export.run(_cfg(tmp_path, ft), progress=False)

    merged = _load(out)  # plain transformers, no stcompress on the load path
    processor = transformers.AutoProcessor.from_pretrained(str(out))
    got = _logits(merged, processor, audio)
    # merged == base + adapter (measured max difference ~2e-4 on logits up to ~6: fp32 rounding of W + BA)
    assert torch.allclose(got, expected, atol=1e-3, rtol=1e-3)
    assert (got - base_logits).abs().max() > 0.5  # and the adapter did change the model

    manifest = read_manifest(out)
    assert manifest["stage"] == "export" and manifest["source"]["kind"] == "lora"
    assert manifest["reload_check"]["identical"] is True
    assert manifest["removed_layers"] == [2] and manifest["original_model"] == "Qwen/Qwen2-Audio-7B-Instruct"
    sizes = component_bytes(out)
    assert sum(sizes["components"].values()) == sizes["total"] == weight_bytes(out) == manifest["size"]["total"]
    assert all(set(d) == {"F32"} for d in sizes["dtypes"].values())
    card = (out / "README.md").read_text()
    assert "removed (original numbering): 2" in card and "lora" in card and "ymoslem/ACL-6060" in card
    assert "base_model: \"Qwen/Qwen2-Audio-7B-Instruct\"" in card and "| embed_tokens |" in card


def _rewrite_adapter(src: Path, dst: Path, rename=lambda k: k, keep=lambda k: True) -> Path:
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True)
    (dst / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    weights = load_file(str(src / "adapter_model.safetensors"))
    save_file({rename(k): v for k, v in weights.items() if keep(k)}, str(dst / "adapter_model.safetensors"))
    return dst


def test_adapter_saved_by_the_other_transformers_family(lora_run, tmp_path):
    """Adapters trained under 4.5x load under 5.x and back: keys are renamed, not silently dropped."""
    ft, pruned, audio, expected, _ = lora_run
    loaded = load_model(ModelConfig(path=str(pruned), device="cpu"))
    other = "4.x" if arch.layout(loaded.model) == "5.x" else "5.x"
    adapter = _rewrite_adapter(ft / "adapter", tmp_path / "other", rename=lambda k: arch.rename_for_layout(k, other))
    export.merge_adapter(loaded, adapter)
    assert torch.allclose(_logits(loaded.model, loaded.processor, audio), expected, atol=1e-3, rtol=1e-3)

    partial = _rewrite_adapter(ft / "adapter", tmp_path / "partial", keep=lambda k: "audio_tower" not in k)
    with pytest.raises(ModelError, match=r"LoRA weights the base model .* needs are not in"):
        export.merge_adapter(load_model(ModelConfig(path=str(pruned), device="cpu")), partial)


def _is_quant_state(name: str) -> bool:
    return any(s in name for s in QUANT_STATE)


def test_nf4_export_keeps_other_tensors_bf16(tmp_path, tiny_model_dir):
    out = export.run(_cfg(tmp_path, tiny_model_dir, dtype="bfloat16", quantize="nf4"), progress=False)
    header = safetensors_header(out / "model.safetensors")
    packed = {n for n in header if n + ".quant_state.bitsandbytes__nf4" in header}
    assert packed and all(header[n]["dtype"] == "U8" for n in packed)
    others = {n: e["dtype"] for n, e in header.items() if n not in packed and not _is_quant_state(n)}
    assert set(others.values()) == {"BF16"}, {n: d for n, d in others.items() if d != "BF16"}
    by_component = {arch.component_of(n) for n in packed}
    assert by_component == {"audio_tower", "projector", "decoder_layers"}  # lm_head kept by default
    assert header["language_model.lm_head.weight"]["dtype"] == "BF16"

    manifest = read_manifest(out)
    check = manifest["reload_check"]
    assert check["identical"] and check["token_agreement"] == 1.0  # measured: exact on CPU, both transformers
    sizes = manifest["size"]
    assert sum(sizes["components"].values()) == sizes["total"] == weight_bytes(out)
    assert manifest["model"]["quantization"]["kept_in_dtype"] == ["embed_tokens", "lm_head"]
    reloaded = _load(out)  # plain from_pretrained reads the quantization config from config.json
    assert type(arch.decoder_layers(reloaded)[0].mlp.up_proj).__name__ == "Linear4bit"
    assert "4-bit" in (out / "README.md").read_text()


def test_nf4_export_keep_audio_tower_quantize_lm_head(tmp_path, tiny_model_dir):
    cfg = _cfg(tmp_path, tiny_model_dir, dtype="bfloat16", quantize="nf4", keep_unquantized=("audio_tower", "projector"),
               check_segments=1, check_max_new_tokens=4)
    out = export.run(cfg, progress=False)
    header = safetensors_header(out / "model.safetensors")
    dtypes: dict[str, set[str]] = {}
    for name, entry in header.items():
        dtypes.setdefault(arch.component_of(name), set()).add(entry["dtype"])
    assert dtypes["audio_tower"] == {"BF16"} and dtypes["projector"] == {"BF16"}
    assert "U8" in dtypes["lm_head"] and dtypes["embed_tokens"] == {"BF16"}
    assert read_manifest(out)["reload_check"]["identical"]


# ---------------------------------------------------------------------------------------------
# Bad inputs: one-line errors that name the item and the fix, before any model loads


def _finetune_dir(tmp_path: Path, manifest: dict | None, adapter_files: tuple[str, ...] = ()) -> Path:
    ft = tmp_path / "ft"
    (ft / "adapter").mkdir(parents=True)
    for name in adapter_files:
        (ft / "adapter" / name).write_text("{}")
    if manifest is not None:
        (ft / "manifest.json").write_text(json.dumps(manifest))
    return ft


@pytest.mark.parametrize(
    ("manifest", "files", "message"),
    [
        (None, (), "has no manifest.json"),
        ({"stage": "finetune", "mode": "lora", "base_model": "x"}, (), "no adapter_config.json or adapter weights"),
        ({"stage": "finetune", "mode": "qlora", "base_model": "/nonexistent/base"},
         ("adapter_config.json", "adapter_model.safetensors"), "base_model (from"),
        ({"stage": "finetune", "mode": "qlora"}, ("adapter_config.json", "adapter_model.safetensors"), "names no base model"),
        ({"stage": "finetune", "mode": "full"}, (), "model is missing"),
        ({"stage": "finetune", "mode": "dora"}, (), "records mode 'dora'"),
    ],
)
def test_bad_finetune_inputs(tmp_path, manifest, files, message):
    ft = _finetune_dir(tmp_path, manifest, files)
    with pytest.raises(ModelError) as err:
        export.run(_cfg(tmp_path, ft), progress=False)
    assert message in str(err.value) and "\n" not in str(err.value) and "; " in str(err.value)


def test_bad_plain_inputs(tmp_path, monkeypatch, tiny_model_dir):
    with pytest.raises(ModelError, match="input: .*does not exist"):
        export.run(_cfg(tmp_path, tmp_path / "nowhere"), progress=False)
    with pytest.raises(ConfigError, match="input: required"):
        export.run(ExportConfig(), progress=False)
    with pytest.raises(ConfigError, match="embed_tokens is never quantized"):
        load_config(ExportConfig, {"input": "x", "keep_unquantized": ["embed_tokens"]})
    real = export.importlib.util.find_spec
    monkeypatch.setattr(export.importlib.util, "find_spec", lambda name: None if name == "bitsandbytes" else real(name))
    with pytest.raises(ModelError, match="nf4 needs bitsandbytes.*pip install"):
        export.run(_cfg(tmp_path, tiny_model_dir, quantize="nf4"), progress=False)


def test_cli_prints_one_line_error(tmp_path, capsys):
    code = cli.main(["export", "--input", str(tmp_path / "nowhere"), "--output", str(tmp_path / "out"), "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("stcompress export: error: input:")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, component", [
    ("language_model.model.layers.0.mlp.up_proj.weight", "decoder_layers"),
    ("model.language_model.layers.7.self_attn.q_proj.weight", "decoder_layers"),
    ("model.language_model.model.embed_tokens.weight", "embed_tokens"),  # prefixes differ between versions
    ("language_model.model.embed_tokens.weight", "embed_tokens"),
    ("audio_tower.layers.3.fc1.weight", "audio_tower"),
    ("model.multi_modal_projector.linear.weight", "projector"),
    ("language_model.lm_head.weight", "lm_head"),
    ("model.language_model.norm.weight", "other"),
])
def test_component_of_any_prefix(name, component):
    from stcompress.model.arch import component_of

    assert component_of(name) == component
