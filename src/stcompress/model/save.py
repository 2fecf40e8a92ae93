"""Saving models so that plain `from_pretrained` loads them, and proving it.

Every model stcompress writes goes through `save_model` and then `reload_check`: reload from disk
(transformers only, no stcompress code on the load path) and greedy-translate a few segments;
the output must equal the in-memory model's, token for token.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from stcompress.config import GenerationConfig, ModelConfig
from stcompress.data.example import Example
from stcompress.errors import ModelError

log = logging.getLogger(__name__)


def make_processor_files_portable(directory: Path, processor: Any) -> None:
    """Let a directory saved by transformers 5.x load in 4.5x too (4.5x output already loads in 5.x).

    5.x folds the feature extractor into processor_config.json, which 4.5x's AutoProcessor does
    not read, and stores the extra special tokens as a list under `extra_special_tokens`, a key
    4.5x expects to be a dict. Writing preprocessor_config.json and the list under its 4.5x name
    (`additional_special_tokens`, which 5.x still accepts) fixes both. A tokenizer that is only a
    tokenizer.json (the testbed's Gemma vocabulary) is saved by 5.x as `TokenizersBackend`, a
    class 4.5x does not have; both families load `PreTrainedTokenizerFast` from the same file
    (5.x as its TokenizersBackend), so that name is written instead.
    """
    directory = Path(directory)
    if not (directory / "preprocessor_config.json").is_file():
        processor.feature_extractor.to_json_file(str(directory / "preprocessor_config.json"))
    path = directory / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    changed = False
    extra = config.get("extra_special_tokens")
    if isinstance(extra, list):
        config["additional_special_tokens"] = config.pop("extra_special_tokens")
        changed = True
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        changed = True
    if changed:
        path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _legacy_rope(config: dict[str, Any]) -> None:
    """Add 4.5x's rope keys beside 5.x's `rope_parameters` in one (sub)config dict.

    5.x reads `rope_parameters` first; 4.5x reads only `rope_theta` / `rope_scaling` (and Gemma 3's
    `rope_local_base_freq` for its sliding layers) and falls back to 10000 without them.
    """
    params = config.get("rope_parameters")
    if not isinstance(params, dict):
        return
    per_type = {k: v for k, v in params.items() if isinstance(v, dict)}
    full = per_type.get("full_attention", params) if per_type else params
    if "rope_theta" in full:
        config["rope_theta"] = full["rope_theta"]
    if "rope_theta" in per_type.get("sliding_attention", {}):
        config["rope_local_base_freq"] = per_type["sliding_attention"]["rope_theta"]
    scaling = {k: v for k, v in full.items() if k != "rope_theta"}
    config["rope_scaling"] = scaling if scaling.get("rope_type", "default") != "default" else None


def make_config_portable(directory: Path) -> None:
    """Let config.json written by transformers 5.x load to the same model in 4.5x (the reverse holds).

    5.x keeps the rotary base only in `rope_parameters` (a 4.5x reader silently decodes with base
    10000) and the dtype under `dtype` (4.5x before 4.56 reads `torch_dtype`): write both spellings.
    """
    path = Path(directory) / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))

    def visit(node: dict[str, Any]) -> None:
        _legacy_rope(node)
        if "dtype" in node and "torch_dtype" not in node:
            node["torch_dtype"] = node["dtype"]
        for value in node.values():
            if isinstance(value, dict) and "model_type" in value:
                visit(value)

    before = json.dumps(config, sort_keys=True)
    visit(config)
    if json.dumps(config, sort_keys=True) != before:
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_model(model: Any, processor: Any, directory: str | Path) -> Path:
    """safetensors weights + config + generation config + processor (tokenizer, chat template),
    readable by transformers 4.5x and 5.x alike."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory), safe_serialization=True)
    make_config_portable(directory)
    processor.save_pretrained(str(directory))
    make_processor_files_portable(directory, processor)
    return directory


def _dtype_name(model: Any) -> str:
    dtype = next(model.parameters()).dtype
    return {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, "float32")


# GPU kernels are not bitwise run-to-run deterministic (transformers' own decoding of one model
# diverges between two runs: benchmarks/results/decode_determinism_h200.json), and greedy decoding
# amplifies any difference. So on CUDA a diverging greedy comparison falls back to a teacher-forced
# one: the same token sequences through both models, next-token logits compared. A real save bug
# (a wrong or missing tensor) moves logits by their own size; kernel noise by well under 1%.
GPU_LOGIT_TOLERANCE = 0.02  # mean |logit difference| / mean |logit|


@torch.no_grad()
def teacher_forced_difference(a: Any, b: Any, processor: Any, examples: Sequence[Example], texts: Sequence[str]) -> dict[str, Any]:
    """Feed prompt + text through models a and b; compare their next-token logits on the text."""
    from stcompress.model import arch
    from stcompress.translate import Translator

    diff = scale = 0.0
    agree = total = 0
    for ex, text in zip(examples, texts):
        logits = []
        for model in (a, b):
            translator = Translator(model, processor, progress=False)
            target = translator.prompt.target_ids(text)
            embeds, mask = translator.build_inputs([ex], translator.encode([ex]), [target])
            hidden = arch.run_decoder(model, embeds, mask).last_hidden_state
            logits.append(arch.lm_head(model)(hidden[0, -len(target) - 1 : -1]).float().cpu())
        diff += float((logits[0] - logits[1]).abs().mean())
        scale += float(logits[0].abs().mean())
        agree += int((logits[0].argmax(-1) == logits[1].argmax(-1)).sum())
        total += logits[0].shape[0]
    return {"positions": total, "argmax_agreement": agree / max(total, 1), "relative_logit_difference": diff / max(scale, 1e-12)}


def reload_check(
    model: Any, processor: Any, directory: str | Path, examples: Sequence[Example], *, max_new_tokens: int = 16,
    generation: GenerationConfig | None = None,
) -> dict[str, Any]:
    """Reload `directory` and require the same greedy output as the in-memory model (on CUDA: or
    teacher-forced logits within GPU_LOGIT_TOLERANCE, see above). `generation`: the stage's decoding
    options (static_cache, ...), so the check decodes the way the stage's users will."""
    from stcompress.model.load import load_model
    from stcompress.translate import Translator

    gen = dataclasses.replace(generation or GenerationConfig(), max_new_tokens=max_new_tokens,
                              batch_size=max(1, len(examples)))
    device = next(model.parameters()).device
    before = Translator(model, processor, generation=gen, progress=False).translate(examples)
    reloaded = load_model(ModelConfig(path=str(directory), dtype=_dtype_name(model), device=str(device)))
    after = Translator(reloaded.model, reloaded.processor, generation=gen, progress=False).translate(examples)
    diff = [b.id for b, a in zip(before, after) if (b.text, b.n_tokens) != (a.text, a.n_tokens)]
    result: dict[str, Any] = {"segments": len(examples), "max_new_tokens": max_new_tokens, "identical": not diff}
    if diff and device.type == "cuda":
        forced = teacher_forced_difference(model, reloaded.model, processor, examples, [h.text for h in before])
        result["teacher_forced"] = forced
        if forced["relative_logit_difference"] <= GPU_LOGIT_TOLERANCE:
            log.info("reload check: greedy outputs diverge on %d segments (GPU nondeterminism); teacher-forced logits "
                     "agree within %.4f", len(diff), forced["relative_logit_difference"])
            diff = []
    del reloaded
    if diff:
        raise ModelError(
            f"reload check: the model saved in {directory} decodes differently from the model in memory "
            f"on {len(diff)} of {len(examples)} segments ({', '.join(diff[:3])}); the save is not trustworthy, "
            "report this with the manifest"
        )
    log.info("reload check passed: %d segments from %s", len(examples), directory)
    return result
