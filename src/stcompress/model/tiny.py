"""Tiny random-weight Qwen2-Audio checkpoints for tests and the offline demo.

They follow the real token path (Qwen BPE vocabulary, Qwen2-Audio special tokens and chat
template, a real WhisperFeatureExtractor) and load with plain
`Qwen2AudioForConditionalGeneration.from_pretrained` / `AutoProcessor.from_pretrained`, so every
stage can run end to end on CPU without the hub. Only the widths and depths are small.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stcompress.errors import ModelError
from stcompress.model.save import save_model
from stcompress.model.tokenizer import (
    AUDIO_TOKEN_ID,
    CHAT_EOS_TOKEN_ID,
    PAD_TOKEN_ID,
    QWEN2_AUDIO_CHAT_TEMPLATE,
    atomic_dir,
    build_qwen2_audio_tokenizer,
    cache_root,
)

_REAL_IDS = {"pad": PAD_TOKEN_ID, "eos": CHAT_EOS_TOKEN_ID, "audio": AUDIO_TOKEN_ID}

# Bump when build_tiny_model writes different files or weights for the same arguments.
_FORMAT_VERSION = 1

# 151,649 ids are used (151,643 BPE ranks + 6 added tokens); padded to a multiple of 64 like the
# real checkpoint (156,032) so matmul shapes stay aligned, but without its 4k unused rows.
TINY_VOCAB_SIZE = 151680

# Scale of q/k weights relative to 1/sqrt(fan_in): sharper attention, audio-dependent output.
_QK_GAIN = 2.0

BUILTIN_MODELS: dict[str, dict[str, Any]] = {
    # The offline demo model: 4 decoder layers so layer pruning has candidates (1..2 removable).
    "tiny-random": dict(text_layers=4, hidden_size=64, intermediate_size=128, audio_layers=2, seed=0),
}


@dataclass(frozen=True)
class TinySpec:
    """Shape and seed of a tiny model: small widths and depths, real vocabulary and mel layout."""

    text_layers: int = 4
    hidden_size: int = 64
    intermediate_size: int = 128
    num_heads: int = 4
    num_kv_heads: int = 2
    audio_layers: int = 2
    audio_d_model: int = 64
    audio_heads: int = 4
    audio_ffn: int = 128
    num_mel_bins: int = 80  # Whisper tiny/base layout, so real Whisper encoder weights could drop in
    seed: int = 0
    dtype: torch.dtype = torch.float32
    rope_theta: float = 10000.0  # Gemma 3: the full-attention layers' base (sliding layers: 10000)
    # "qwen2" (the real model's text decoder) or "gemma3_text": Gemma 3's decoder with `layer_types`
    # mixing "sliding_attention" and "full_attention" and a `sliding_window` (tokens)
    text_model_type: str = "qwen2"
    layer_types: tuple[str, ...] | None = None
    sliding_window: int | None = None


def padded_vocab(n_ids: int) -> int:
    """Embedding rows for `n_ids` token ids, padded to a multiple of 64 like the real checkpoint."""
    return -(-n_ids // 64) * 64


def tiny_config(spec: TinySpec, *, vocab_size: int = TINY_VOCAB_SIZE, ids: dict[str, int] | None = None) -> Any:
    """A Qwen2AudioConfig shaped like the 7B model (untied head, rope 10000), only smaller.

    `vocab_size` / `ids` (pad, eos, audio: `tokenizer.token_ids`) for a trimmed vocabulary."""
    ids = ids or _REAL_IDS
    from transformers import Qwen2AudioConfig

    audio = dict(
        model_type="qwen2_audio_encoder", num_mel_bins=spec.num_mel_bins, encoder_layers=spec.audio_layers,
        encoder_attention_heads=spec.audio_heads, encoder_ffn_dim=spec.audio_ffn, d_model=spec.audio_d_model,
        # The feature extractor always pads to 30 s = 3000 frames -> 1500 positions after conv2.
        max_source_positions=1500, activation_function="gelu", scale_embedding=False,
    )
    text = dict(
        model_type="qwen2", vocab_size=vocab_size, hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size, num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads, hidden_act="silu",
        max_position_embeddings=8192, rope_theta=spec.rope_theta, rms_norm_eps=1e-6,
        tie_word_embeddings=False, use_sliding_window=False,
        bos_token_id=ids["pad"], eos_token_id=ids["eos"],
    )
    if spec.text_model_type == "gemma3_text":
        text = _gemma3_text(spec, text, ids)
    elif spec.text_model_type != "qwen2":
        raise ModelError(f"tiny model: text_model_type {spec.text_model_type!r} is not built; use qwen2 or gemma3_text")
    # `audio_token_index` is the stored name in 4.5x and 5.x; both map `audio_token_id` onto it.
    return Qwen2AudioConfig(
        audio_config=audio, text_config=text, audio_token_index=ids["audio"], tie_word_embeddings=False
    )


def _gemma3_text(spec: TinySpec, qwen: dict[str, Any], ids: dict[str, int]) -> dict[str, Any]:
    """Gemma 3's decoder (q/k norms, sandwich norms, scaled embeddings, per-layer sliding or full
    attention with their own rope bases) in the tiny widths; Gemma 3 270M's text model, only smaller."""
    layer_types = list(spec.layer_types or ["sliding_attention"] * (spec.text_layers - 1) + ["full_attention"])
    if len(layer_types) != spec.text_layers:
        raise ModelError(f"tiny model: layer_types has {len(layer_types)} entries for {spec.text_layers} text layers; give one per layer")
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "rope_theta", "rms_norm_eps", "tie_word_embeddings")
    head_dim = spec.hidden_size // spec.num_heads
    return {k: qwen[k] for k in keep} | dict(
        model_type="gemma3_text", head_dim=head_dim, query_pre_attn_scalar=head_dim,
        hidden_activation="gelu_pytorch_tanh", layer_types=layer_types, sliding_window=spec.sliding_window or 4096,
        rope_local_base_freq=10000.0, pad_token_id=ids["pad"], bos_token_id=ids["pad"], eos_token_id=ids["eos"],
    )


def _sinusoids(length: int, channels: int) -> torch.Tensor:
    """Whisper's fixed sinusoidal positions, which Qwen2-Audio's encoder starts from."""
    half = channels // 2
    inv = torch.exp(-math.log(10000) / (half - 1) * torch.arange(half))
    t = torch.arange(length)[:, None] * inv[None, :]
    return torch.cat([torch.sin(t), torch.cos(t)], dim=1)


def init_tiny_weights(model: nn.Module, used_vocab: int, seed: int) -> None:
    """Fan-in scaled init so a random model's greedy output depends on its audio.

    With the 0.02 default every activation is tiny, attention is uniform and greedy decoding
    emits one token forever, whatever the audio. 1/sqrt(fan_in) keeps activations O(1) through
    both towers, and q/k weights twice that make attention peaked (measured: six different clips
    give six different greedy outputs of mostly distinct tokens; with plain 1/sqrt(fan_in) only
    three). Logit rows of the padding ids (no token text) are zeroed so greedy decoding always
    picks a decodable token.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv1d)):
                gain = _QK_GAIN if name.endswith(("q_proj", "k_proj")) else 1.0
                std = gain / math.sqrt(module.weight[0].numel())
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * std)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                if name.endswith("embed_positions"):
                    module.weight.copy_(_sinusoids(*module.weight.shape))
                else:
                    module.weight.copy_(torch.randn(module.weight.shape, generator=gen))
        model.get_output_embeddings().weight[used_vocab:].zero_()


def _feature_extractor(num_mel_bins: int) -> Any:
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(
        feature_size=num_mel_bins, sampling_rate=16000, hop_length=160, chunk_length=30,
        n_fft=400, padding_value=0.0, return_attention_mask=True,
    )


def _generation_config(ids: dict[str, int] | None = None) -> Any:
    from transformers import GenerationConfig

    ids = ids or _REAL_IDS
    return GenerationConfig(
        bos_token_id=ids["pad"], eos_token_id=[ids["eos"], ids["pad"]], pad_token_id=ids["pad"], do_sample=False,
    )


def build_tiny_model(out_dir: str | Path, **spec: Any) -> Path:
    """Build and save a tiny random Qwen2-Audio checkpoint (model + processor) at `out_dir`.

    `spec` takes TinySpec's fields (text_layers=4, hidden_size=64, ..., seed=0, dtype=float32).
    Written atomically: `out_dir` either does not exist or is complete.
    """
    from transformers import Qwen2AudioForConditionalGeneration, Qwen2AudioProcessor

    tiny = TinySpec(**spec)
    out = Path(out_dir)
    if out.exists():
        raise ModelError(f"tiny model: {out} already exists; remove it or choose another directory")
    config = tiny_config(tiny)
    tokenizer = build_qwen2_audio_tokenizer()
    torch.manual_seed(tiny.seed)
    model = Qwen2AudioForConditionalGeneration(config)
    init_tiny_weights(model, used_vocab=len(tokenizer), seed=tiny.seed)
    model = model.to(tiny.dtype).eval()
    model.generation_config = _generation_config()
    processor = Qwen2AudioProcessor(
        feature_extractor=_feature_extractor(tiny.num_mel_bins),
        tokenizer=tokenizer,
        chat_template=QWEN2_AUDIO_CHAT_TEMPLATE,
    )
    with atomic_dir(out) as tmp:
        save_model(model, processor, tmp)
        (tmp / "stcompress_tiny.json").write_text(json.dumps(_spec_record(tiny), indent=2))
    return out


# Fields added after the first release: recorded only when set, so older cache keys stay valid.
_OPTIONAL_FIELDS = {"rope_theta": 10000.0, "text_model_type": "qwen2", "layer_types": None, "sliding_window": None}


def _spec_record(tiny: TinySpec) -> dict[str, Any]:
    record = {k: str(v) if isinstance(v, torch.dtype) else v for k, v in asdict(tiny).items()}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in record.items()
            if k not in _OPTIONAL_FIELDS or v != _OPTIONAL_FIELDS[k]}


def _cache_key(tiny: TinySpec) -> str:
    import transformers

    # Each transformers major writes its own layout (module names, processor files), so the
    # cache keeps one build per major version.
    major = transformers.__version__.split(".")[0]
    blob = json.dumps(_spec_record(tiny) | {"_format": _FORMAT_VERSION, "_transformers": major}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def tiny_model_cache(**spec: Any) -> Path:
    """`build_tiny_model(**spec)` built once per cache dir and reused (tests, demo)."""
    final = cache_root() / f"tiny-qwen2-audio-{_cache_key(TinySpec(**spec))}"
    if not (final / "config.json").is_file():
        try:
            build_tiny_model(final, **spec)
        except ModelError:
            if not (final / "config.json").is_file():  # a concurrent builder won; else re-raise
                raise
    return final


def _demo_base() -> Path:
    from stcompress.model.whisper_init import demo_base_model  # needs the Whisper weights package

    return demo_base_model()


# `builtin:<name>` -> how to build (once per cache dir) and locate it.
_BUILTIN_BUILDERS = {
    **{name: (lambda spec=spec: tiny_model_cache(**spec)) for name, spec in BUILTIN_MODELS.items()},
    "demo-base": _demo_base,  # the offline demo's untrained model (real Whisper tiny.en encoder)
}


def resolve_builtin(name: str) -> Path:
    """Path of a built-in model such as `tiny-random` (what `builtin:tiny-random` points to)."""
    if name not in _BUILTIN_BUILDERS:
        known = ", ".join(f"builtin:{n}" for n in _BUILTIN_BUILDERS)
        raise ModelError(f"model.path: unknown built-in model builtin:{name}; use one of {known}")
    return _BUILTIN_BUILDERS[name]()
