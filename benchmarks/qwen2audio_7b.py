"""The real Qwen2-Audio-7B-Instruct architecture with random weights, for cost benchmarks.

Shapes from PAPER.md (8,397,094,912 parameters). Random weights are fine where cost, not quality,
is measured; outputs are noise. `--arch tiny` gives the same code path at toy size for a CPU dry run.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
import transformers

from stcompress.model.tiny import TINY_VOCAB_SIZE, build_tiny_model, tiny_model_cache  # noqa: F401
from stcompress.model.tokenizer import QWEN2_AUDIO_CHAT_TEMPLATE, build_qwen2_audio_tokenizer

SEVEN_B = dict(
    audio=dict(num_mel_bins=128, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120, d_model=1280,
               max_source_positions=1500),
    text=dict(vocab_size=156032, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
              num_key_value_heads=32, rope_theta=10000.0, max_position_embeddings=8192, tie_word_embeddings=False),
)
TINY = dict(
    audio=dict(num_mel_bins=128, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128, d_model=64,
               max_source_positions=1500),
    text=dict(vocab_size=TINY_VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=32, num_attention_heads=4,
              num_key_value_heads=4, rope_theta=10000.0, max_position_embeddings=8192, tie_word_embeddings=False),
)


def config(arch: str) -> Any:
    spec = SEVEN_B if arch == "7b" else TINY
    audio = transformers.Qwen2AudioEncoderConfig(**spec["audio"])
    text = transformers.Qwen2Config(**spec["text"])
    return transformers.Qwen2AudioConfig(audio_config=audio.to_dict(), text_config=text.to_dict(), audio_token_index=151646)


def build(arch: str, device: str, dtype: torch.dtype) -> tuple[Any, Any, float]:
    """Model with random weights made directly on `device` in `dtype`, and a real processor."""
    t0 = time.perf_counter()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = transformers.Qwen2AudioForConditionalGeneration(config(arch))
    finally:
        torch.set_default_dtype(previous)
    model.eval()
    model.generation_config.pad_token_id = 151643
    model.generation_config.eos_token_id = [151645, 151643]
    feature_extractor = transformers.WhisperFeatureExtractor(feature_size=128, sampling_rate=16000)
    processor = transformers.Qwen2AudioProcessor(
        feature_extractor=feature_extractor, tokenizer=build_qwen2_audio_tokenizer(), chat_template=QWEN2_AUDIO_CHAT_TEMPLATE
    )
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return model, processor, time.perf_counter() - t0


def clips(n: int, seconds: float, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(0.1 * rng.standard_normal(int(16000 * seconds))).astype(np.float32) for _ in range(n)]


def decoder_bytes(model: Any, n_layers: int) -> int:
    """Bytes a decode step must read: n decoder layers + final norm + LM head."""
    from stcompress.model import arch

    layer = sum(p.numel() * p.element_size() for p in arch.decoder_layers(model)[0].parameters())
    head = arch.lm_head(model).weight
    norm = arch.text_model(model).norm.weight
    return n_layers * layer + head.numel() * head.element_size() + norm.numel() * norm.element_size()
