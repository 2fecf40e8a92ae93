"""The testbed pack: everything the base model is built from, in one compact GGUF file.

Why a pack: the GPU machine cannot download, and each transfer to it carries at most ~55 MiB. A
saved fp16 base model is ~290 MB; the pack is ~125 MB because Gemma's decoder stays in the GGUF's
own 4/5/6/8-bit blocks (copied byte for byte, so lossless with respect to the registry file), the
trimmed embedding keeps only its kept rows (Q8_0 rows are self-contained 34-byte blocks), and the
Whisper-base encoder is stored in its original float16. `materialise` turns a pack into a saved
Qwen2-Audio model on any machine (numpy dequantization by the `gguf` package, no GPU needed), so the
CPU rebuild and the GPU build are the same function on the same bytes.

Contents: tensors `gemma.<gguf name>` and `whisper.<Qwen2AudioEncoder name>`; string fields
`stcompress.text_config` (the Gemma3 text config, JSON), `stcompress.tokenizer` (the trimmed
tokenizer.json), `stcompress.old_token_ids` (JSON: Gemma id of each kept row), `stcompress.sources`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from stcompress.errors import ModelError

PACK_FORMAT = 1
_ARCH = "stcompress-testbed"
_TEXT_CONFIG_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_activation", "max_position_embeddings", "rms_norm_eps",
    "rope_theta", "rope_local_base_freq", "rope_parameters", "query_pre_attn_scalar", "sliding_window",
    "layer_types", "final_logit_softcapping", "attn_logit_softcapping", "attention_bias", "attention_dropout",
    "use_bidirectional_attention",
)


def _gguf() -> Any:
    try:
        import gguf
    except ModuleNotFoundError:
        raise ModelError("testbed: pip install gguf (0.19; the GPU machine: install the carried wheel)") from None
    return gguf


def gemma_text_config(config: Any, vocab_size: int) -> dict[str, Any]:
    """A plain Gemma3TextConfig dict (no quantization fields); the head is untied at build (model.py)."""
    d = config.to_dict()
    out = {k: d[k] for k in _TEXT_CONFIG_KEYS if k in d}
    out.update(model_type="gemma3_text", vocab_size=vocab_size, tie_word_embeddings=False,
               pad_token_id=0, eos_token_id=1, bos_token_id=2)
    return out


def write_pack(gemma_path: Path, whisper_state: dict[str, Any], text_config: dict[str, Any], tokenizer_json: str,
               old_ids: list[int], out: Path, sources: dict[str, Any]) -> Path:
    """Write the pack atomically; byte-identical for the same inputs (fixed tensor and field order)."""
    gguf = _gguf()
    reader = gguf.GGUFReader(str(gemma_path))
    tmp = out.with_name(f".{out.name}.tmp")
    writer = gguf.GGUFWriter(str(tmp), _ARCH)
    writer.add_uint32("stcompress.format", PACK_FORMAT)
    writer.add_string("stcompress.text_config", json.dumps(text_config, sort_keys=True))
    writer.add_string("stcompress.tokenizer", tokenizer_json)
    writer.add_string("stcompress.old_token_ids", json.dumps(old_ids))
    writer.add_string("stcompress.sources", json.dumps(sources, sort_keys=True))
    rows = np.asarray(old_ids, dtype=np.int64)
    for t in reader.tensors:
        data = np.asarray(t.data)
        if t.name == "token_embd.weight":
            data = np.ascontiguousarray(data[rows])
        if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            writer.add_tensor(f"gemma.{t.name}", np.ascontiguousarray(data))
        else:
            writer.add_tensor(f"gemma.{t.name}", data, raw_shape=data.shape, raw_dtype=t.tensor_type)
    for name in sorted(whisper_state):
        writer.add_tensor(f"whisper.{name}", np.ascontiguousarray(whisper_state[name].numpy().astype(np.float16)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, out)
    return out


# GGUF (llama.cpp) tensor names -> Gemma3TextModel parameter names.
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def hf_name(gguf_name: str) -> str:
    if gguf_name == "token_embd.weight":
        return "embed_tokens.weight"
    if gguf_name == "output_norm.weight":
        return "norm.weight"
    blk, idx, part, kind = gguf_name.split(".")
    if blk != "blk" or part not in _LAYER_NAMES:
        raise ModelError(f"testbed: unexpected Gemma tensor {gguf_name} in the pack; rebuild it with build-pack")
    return f"layers.{idx}.{_LAYER_NAMES[part]}.{kind}"


def read_pack(path: Path) -> dict[str, Any]:
    """Fields and float32 tensors of a pack: {'text_config', 'tokenizer', 'old_ids', 'sources', 'gemma', 'whisper'}.

    Gemma's norms are stored by llama.cpp as 1 + w (Gemma's RMSNorm multiplies by 1 + weight), so
    1 is subtracted back, as transformers' own GGUF loader does.
    """
    gguf = _gguf()
    if not Path(path).is_file():
        raise ModelError(f"testbed: pack {path} not found; build it with `python -m stcompress.testbed build-pack`")
    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if k.startswith("stcompress.")}
    if fields.get("stcompress.format") != PACK_FORMAT:
        raise ModelError(f"testbed: {path} is not a format-{PACK_FORMAT} testbed pack; rebuild it with build-pack")
    gemma, whisper = {}, {}
    for t in reader.tensors:
        array = gguf.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32)
        group, name = t.name.split(".", 1)
        if group == "gemma":
            if name.endswith("norm.weight"):
                array = array - 1.0
            gemma[hf_name(name)] = array
        else:
            whisper[name] = array
    return {
        "text_config": json.loads(fields["stcompress.text_config"]),
        "tokenizer": fields["stcompress.tokenizer"],
        "old_ids": json.loads(fields["stcompress.old_token_ids"]),
        "sources": json.loads(fields["stcompress.sources"]),
        "gemma": gemma,
        "whisper": whisper,
    }


def read_sources(path: Path) -> dict[str, Any]:
    """The pack's `stcompress.sources` field only (no tensor is dequantized)."""
    reader = _gguf().GGUFReader(str(path))
    return json.loads(reader.fields["stcompress.sources"].contents())
