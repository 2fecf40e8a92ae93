"""Vocabulary trimming at export (`export --trim-vocab`): keep the tokens a target language needs.

Qwen2-Audio-7B's embedding and LM head are 2 x 156,032 x 4096 weights (2.56 GB in bf16), most of
them rows a German or Chinese translator never reads or writes. The kept set: every token the full
tokenizer encodes the run's own target texts with (the references of its training data, KD
targets and raw teacher outputs) and the prompt with, plus a safety set (every added token: chat,
audio, eos/pad; the 256 byte tokens, so any text still encodes losslessly; digits and
punctuation), closed under the BPE merges (stcompress.model.vocab), so every kept text encodes
exactly as with the full vocabulary: checked on all of them, through the processor that is saved.
The rows are then padded to a multiple of 8 with the lowest-id tokens left out (at most 7 rows):
an int8 LM head with a row count that is not a multiple of 4 fails in bitsandbytes' CUDA matmul.

The embedding and LM head keep those rows only (arch.slice_vocab), so the trimmed model cannot emit
another id. Its LM head scores every kept token exactly as before: greedy decoding equals the full
model's (mapped to the new ids) whenever each token the full model picks is kept. Where the full
model would pick a dropped token, the trimmed one picks the best kept token instead (often a
shorter piece of the same word, or another word), and the continuation can part ways; beam search
and sampling differ likewise (sampling also renormalises over the kept tokens).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stcompress.artifacts import path_identity
from stcompress.config import DatasetMix, DataConfig, VocabConfig, load_config
from stcompress.errors import ConfigError, ModelError, StcompressError
from stcompress.metrics.efficiency import count_parameters
from stcompress.model import arch, vocab

log = logging.getLogger(__name__)

# The kept rows are padded to a multiple of 8 with the lowest-id tokens not kept (with their merge
# steps): bitsandbytes' CUDA int8 matmul fails on an LM head whose rows are not a multiple of 4
# (quantize.INT8_OUT_MULTIPLE, measured), and GPU matmuls prefer multiples of 8.
ROW_MULTIPLE = 8
_SLOW_TOKENIZER_FILES = ("vocab.json", "merges.txt", "added_tokens.json", "tokenizer.model")


@dataclass
class KeptTexts:
    """The texts whose tokens are kept, and where they came from (for the manifest and card)."""

    texts: list[str]
    sources: list[dict[str, Any]] = field(default_factory=list)  # {"kind", "name", "texts"}
    inputs: dict[str, Any] = field(default_factory=dict)  # identities, for the manifest
    origin: str = "vocab options"  # or "training data upstream" (the finetune manifests' sources)


def _mixes(cfg: VocabConfig, finetunes: list[dict[str, Any]], data: DataConfig | None
           ) -> tuple[list[tuple[str, DatasetMix]], str]:
    data = data or DataConfig()
    given = [*((f"vocab.datasets[{i}]", m) for i, m in enumerate(cfg.datasets)),
             *(("vocab.distilled", DatasetMix(distilled=d)) for d in cfg.distilled),
             *(("vocab.references", DatasetMix(data=dataclasses.replace(data, dataset=d, format="auto", limit=None)))
               for d in cfg.references)]
    if given:
        return given, "vocab options"
    found: list[tuple[str, DatasetMix]] = []
    for manifest in finetunes:
        config = manifest.get("config") or {}
        entries = config.get("datasets") or ([{"data": config["data"]}] if config.get("data") else [])
        for i, entry in enumerate(entries):
            try:
                found.append((f"the finetune manifest's datasets[{i}]", load_config(DatasetMix, entry, check=False)))
            except ConfigError as exc:
                raise ConfigError([f"vocab: the training data recorded upstream is unreadable ({exc.problems[0]}); "
                                   "give --vocab.references, --vocab.distilled or vocab.datasets"]) from None
    if not found:
        raise ConfigError(["vocab: trim_vocab needs texts and no finetune manifest upstream of the input records its "
                           "training data; give --vocab.references DATASET, --vocab.distilled DISTILL_DIR or vocab.datasets (YAML)"])
    return found, "training data upstream"


def kept_texts(cfg: VocabConfig, finetunes: list[dict[str, Any]], data: DataConfig | None = None) -> KeptTexts:
    """Read every source's texts (no audio), before any model loads; each problem names its source.
    `data`: the options `vocab.references` are read with (the export's data section)."""
    from stcompress.data.distilled import distilled_texts
    from stcompress.data.sources import reference_texts

    mixes, origin = _mixes(cfg, finetunes, data)
    out = KeptTexts(texts=[], origin=origin)
    seen: set[str] = set()
    for where, mix in mixes:
        try:
            if mix.distilled:
                texts, kind, name = distilled_texts(mix.distilled), "distilled", mix.name or mix.distilled
                out.inputs[f"vocab:{name}"] = path_identity(Path(mix.distilled) / "examples.jsonl")
            else:
                texts, kind, name = reference_texts(mix.data), "references", mix.name or mix.data.dataset
                out.inputs[f"vocab:{name}"] = _data_identity(mix.data)
        except StcompressError as exc:
            raise ConfigError([f"vocab ({where}): {exc}"]) from None
        out.sources.append({"kind": kind, "name": name, "texts": len(texts)})
        for text in texts:
            if text not in seen:
                seen.add(text)
                out.texts.append(text)
    if not out.texts:
        raise ConfigError([f"vocab: the sources ({', '.join(s['name'] for s in out.sources)}) hold no texts; "
                           "check their references / distill outputs"])
    return out


def _data_identity(data: DataConfig) -> dict[str, Any]:
    from stcompress.stages.translate import data_identity

    return data_identity(data)


def plan(tokenizer: Any, texts: list[str], *, keep_first: int = 0, extra_ids: tuple[int, ...] = ()
         ) -> tuple[dict[str, Any], list[int]]:
    """(trimmed tokenizer.json, old id of every new id) for a transformers fast tokenizer; no model
    needed, so a size predictor can ask `len(old_ids)` (the trimmed vocab_size) cheaply. The rows
    are a multiple of ROW_MULTIPLE (unless the vocabulary has too few tokens left to pad with)."""
    big = getattr(tokenizer, "backend_tokenizer", None)
    if big is None:
        raise ModelError(f"trim_vocab: the processor's tokenizer ({type(tokenizer).__name__}) has no tokenizer.json "
                         "(not a fast tokenizer); save the model with a fast tokenizer or export without trim_vocab")
    full = json.loads(big.to_str())
    if big.padding or big.truncation:  # transformers left call settings on it: encode with a clean copy
        big = vocab.backend(full)
    keep = vocab.kept_tokens(full, texts, keep_first=keep_first, full_backend=big)
    trimmed, old_ids = vocab.slice_tokenizer_json(full, keep, extra_ids=extra_ids)
    if len(old_ids) % ROW_MULTIPLE:
        keep = vocab.pad_to_multiple(full, keep, set(old_ids), ROW_MULTIPLE)
        trimmed, old_ids = vocab.slice_tokenizer_json(full, keep, extra_ids=extra_ids)
    bad = vocab.inexact(full, trimmed, old_ids, texts, full_backend=big)
    if bad:  # closure makes this unreachable; a tokenizer with unusual merges would land here
        raise ModelError(f"trim_vocab: the trimmed vocabulary encodes {len(bad)} kept texts differently, e.g. {bad[0]!r}; "
                         "export without trim_vocab and report this")
    return trimmed, old_ids


def trimmed_processor(processor: Any, trimmed: dict[str, Any], old_ids: list[int]) -> Any:
    """The processor with the trimmed tokenizer, as `AutoProcessor.from_pretrained` loads it from
    disk (the saved files are exactly these): tokenizer.json replaced, added-token ids renumbered,
    slow-tokenizer files (built from the full vocabulary) left out."""
    from transformers import AutoProcessor

    new_id = {old: new for new, old in enumerate(old_ids)}
    with tempfile.TemporaryDirectory(prefix="stcompress-vocab-") as tmp:
        root = Path(tmp)
        processor.save_pretrained(tmp)
        for name in _SLOW_TOKENIZER_FILES:
            (root / name).unlink(missing_ok=True)
        (root / "tokenizer.json").write_text(json.dumps(trimmed, ensure_ascii=False), encoding="utf-8")
        path = root / "tokenizer_config.json"
        config = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(config.get("added_tokens_decoder"), dict):
            config["added_tokens_decoder"] = {str(new_id[int(k)]): v for k, v in config["added_tokens_decoder"].items()
                                              if int(k) in new_id}
        path.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
        return AutoProcessor.from_pretrained(tmp)


def _config_ids(model: Any) -> tuple[int, ...]:
    """Every token id the configs name (kept whatever the texts)."""
    return config_ids(model.config, model.generation_config)


def config_ids(config: Any, generation_config: Any = None) -> tuple[int, ...]:
    """The ids a model config (and its generation config) name: audio token, bos / eos / pad."""
    out: set[int] = {arch.audio_token_id(config)}
    for obj in (config, arch.text_config(config), generation_config):
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(obj, key, None)
            out.update(v for v in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(v, int) and v >= 0)
    return tuple(sorted(out))


def predicted_rows(model_dir: str, texts: list[str], *, keep_first: int = 0) -> int:
    """The embedding rows `trim_model` will keep for these texts, from the model's files alone (no
    weights): what the size-budget picker needs before anything loads."""
    from transformers import AutoConfig, AutoProcessor, GenerationConfig

    config = AutoConfig.from_pretrained(model_dir)
    try:
        generation = GenerationConfig.from_pretrained(model_dir)
    except OSError:
        generation = None
    tokenizer = AutoProcessor.from_pretrained(model_dir).tokenizer
    return len(plan(tokenizer, texts, keep_first=keep_first, extra_ids=config_ids(config, generation))[1])


def trim_model(loaded: Any, texts: list[str], *, keep_first: int = 0) -> dict[str, Any]:
    """Trim `loaded` (model and processor, in place) to the tokens of `texts`; returns the record
    (kept vocabulary, parameters before/after, the exactness check)."""
    model, tokenizer = loaded.model, loaded.processor.tokenizer
    rows, parameters = arch.vocab_size(model), count_parameters(model)
    trimmed, old_ids = plan(tokenizer, texts, keep_first=keep_first, extra_ids=_config_ids(model))
    if old_ids[-1] >= rows:
        raise ModelError(f"trim_vocab: the tokenizer has id {old_ids[-1]} but the model only {rows} embedding rows; "
                         "the processor does not belong to this model")
    processor = trimmed_processor(loaded.processor, trimmed, old_ids)
    want = tokenizer(texts, add_special_tokens=False)["input_ids"]
    got = processor.tokenizer(texts, add_special_tokens=False)["input_ids"]
    bad = [t for t, a, b in zip(texts, want, got) if [old_ids[i] for i in b] != a]
    if bad:
        raise ModelError(f"trim_vocab: the saved tokenizer encodes {len(bad)} kept texts differently, e.g. {bad[0]!r}; "
                         "export without trim_vocab and report this")
    arch.slice_vocab(model, old_ids)
    loaded.processor = processor
    record = {
        "kept_tokens": len(old_ids), "vocab_size_before": rows, "vocab_size_after": arch.vocab_size(model),
        "tokenizer_ids_before": len(tokenizer), "keep_first": keep_first, "tied_head": arch.tied_head(model),
        "texts": len(texts), "texts_encoded_exactly": len(texts),
        "parameters": {"before": parameters, "after": count_parameters(model)},
        "safety": "every added token (chat, audio, eos/pad), the 256 byte tokens, digits and punctuation",
        "row_multiple": ROW_MULTIPLE,
    }
    log.info("trimmed the vocabulary to %d of %d rows (%d texts encode exactly as before)", len(old_ids), rows, len(texts))
    return record
