"""The model card (README.md) written beside exported weights: what the model is, how it was made.

Everything in it comes from records the stages already wrote (manifests, scores.json) or from the
export itself (sizes read from safetensors headers, the reload check); nothing is recomputed.
The card is what users publish: local paths in it are shown as `<local>/<name>` (the manifest
beside it keeps the resolved paths), hub ids and built-in names as they are.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from stcompress import __version__
from stcompress.languages import language_name
from stcompress.model.arch import COMPONENTS


@dataclass
class CardInfo:
    name: str
    target_lang: str
    base_model: str | None  # the original model the chain started from
    upstream: list[dict[str, Any]]  # upstream stages, oldest first: {"stage", "path", "detail"}
    model: dict[str, Any]  # decoder_layers, parameters, dtype, quantization
    sizes: dict[str, Any]  # metrics.efficiency.component_bytes
    reload_check: dict[str, Any]
    prompt: str | None = None
    removed_layers: list[int] | None = None
    layer_map: list[int] | None = None
    training: dict[str, Any] | None = None  # the finetune manifest, when there is one
    scores: dict[str, Any] | None = None  # an evaluate scores.json
    extra_tags: list[str] = field(default_factory=list)
    vocab: dict[str, Any] | None = None  # the vocab_trim record, when the vocabulary was trimmed
    measured: dict[str, Any] | None = None  # export.measure: safetensors and torch.save bytes
    size_budget: dict[str, Any] | None = None  # the size-budget pick (stcompress.budget)


def public(value: object) -> str:
    """A local path as `<local>/<name>` (no user names, home or mount points of the machine that
    made the model); hub ids (`org/name`), built-in names and other values unchanged."""
    text = str(value)
    if text.startswith("builtin") or "://" in text:
        return text
    local = text.startswith(("/", "~", "./", "../", "\\")) or (len(text) > 2 and text[1] == ":") or os.path.exists(text)
    return f"<local>/{os.path.basename(text.rstrip('/')) or text}" if local else text


def _gb(n: int) -> str:
    """Decimal units, as the IWSLT size bins count them."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}" if unit != "GB" else f"{n / scale:.3f} GB"
    return f"{n} B"


def _front_matter(info: CardInfo) -> list[str]:
    tags = ["stcompress", "qwen2-audio", "speech-translation", *info.extra_tags]
    lines = ["---", "library_name: transformers", f"language: [en, {info.target_lang}]"]
    if info.base_model and public(info.base_model) == info.base_model:  # the hub's field takes hub ids only
        lines.append(f"base_model: {json.dumps(info.base_model)}")
    lines += [f"tags: [{', '.join(tags)}]", "---", ""]
    return lines


def _summary(info: CardInfo) -> Iterator[str]:
    m = info.model
    layers = f"{m['decoder_layers']}"
    if info.removed_layers:
        original = len(info.removed_layers) + m["decoder_layers"]
        layers += f" of {original}; removed (original numbering): {', '.join(map(str, info.removed_layers))}"
    yield "| | |"
    yield "|---|---|"
    yield f"| task | English speech -> {language_name(info.target_lang)} text |"
    yield f"| LM decoder layers | {layers} |"
    if info.layer_map:
        yield f"| layer map (new -> original) | {', '.join(f'{i}->{o}' for i, o in enumerate(info.layer_map))} |"
    yield f"| parameters | {m['parameters']:,} (true weight count, 4-bit weights counted once each) |"
    yield f"| weights | {m['weights']} |"
    yield f"| size on disk | {_gb(info.sizes['total'])} ({info.sizes['total']:,} bytes) |"
    if info.base_model:
        yield f"| made from | `{public(info.base_model)}` |"


def _sizes(info: CardInfo) -> Iterator[str]:
    yield "| component | bytes | share | stored as |"
    yield "|---|---:|---:|---|"
    total = info.sizes["total"] or 1
    for name in (*COMPONENTS, "overhead"):
        size = info.sizes["components"].get(name, 0)
        if not size:
            continue
        dtypes = info.sizes.get("dtypes", {}).get(name, {})
        stored = ", ".join(f"{d} {_gb(b)}" for d, b in sorted(dtypes.items(), key=lambda kv: -kv[1])) or "headers, index"
        yield f"| {name} | {size:,} | {100 * size / total:.1f}% | {stored} |"


def _track_sizes(info: CardInfo) -> Iterator[str]:
    """The two byte counts the IWSLT compression track uses, and the size budget when one was given."""
    m, b = info.measured, info.size_budget
    if m:
        yield f"- `*.safetensors` files: {m['safetensors']:,} bytes ({_gb(m['safetensors'])})"
        yield f"- `torch.save(model.state_dict())`: {m['torch_save']:,} bytes ({_gb(m['torch_save'])}), loaded as `{m['torch_save_loaded_as']}`"
    if b:
        p = b["picked"]
        yield (f"- size budget {b['budget']} ({b['budget_bytes']:,} bytes, measured on {b['measure']}): picked {p['description']} "
               f"of {b['candidates']:,} configurations ({b['fitting']:,} predicted to fit); predicted "
               f"{p['predicted_safetensors']:,} bytes")


def _precision(info: CardInfo) -> Iterator[str]:
    """Bits per component (stcompress.quantize.describe_bits), when the export recorded them."""
    precision = info.model.get("precision")
    if not precision:
        return
    yield "## Bits per component"
    yield ""
    yield "| component | bits | stored as |"
    yield "|---|---:|---|"
    for name, bits in precision["bits"].items():
        yield f"| {name} | {bits if bits != 16 else info.model.get('dtype', '16')} | {precision['stored_as'][name]} |"
    yield ""


def _vocab(info: CardInfo) -> Iterator[str]:
    """What `export --trim-vocab` kept, from where, and what it saved."""
    v = info.vocab
    if not v:
        return
    sources = ", ".join(f"`{public(s['name'])}` ({s['kind']}, {s['texts']} texts)" for s in v.get("sources", []))
    size = v.get("bytes") or {}
    yield "## Vocabulary"
    yield ""
    yield (f"Trimmed to **{v['kept_tokens']:,}** of {v['vocab_size_before']:,} embedding / LM-head rows: the tokens of "
           f"{v['texts']:,} distinct texts (the prompt and {sources}; from the {v['source']}), plus {v['safety']}, "
           "closed under the BPE merges. Every one of those texts encodes exactly as with the full vocabulary; any "
           "other text still encodes (byte by byte at worst). The model cannot emit a token outside this vocabulary.")
    yield ""
    yield "| | before | after |"
    yield "|---|---:|---:|"
    yield f"| vocabulary rows | {v['vocab_size_before']:,} | {v['vocab_size_after']:,} |"
    yield f"| parameters | {v['parameters']['before']:,} | {v['parameters']['after']:,} |"
    if size:
        yield f"| bytes (this format; before: predicted) | {size['before_predicted']:,} | {size['after']:,} |"
    check = v.get("vs_untrimmed") or {}
    if check:
        yield ""
        yield (f"Greedy output against the untrimmed model on {check['segments']} check segments: "
               f"{check['identical_segments']} identical, token agreement {check['token_agreement']:.4f}.")
    yield ""


def _chain(info: CardInfo) -> Iterator[str]:
    if info.base_model:
        yield f"1. original model: `{public(info.base_model)}`"
    for step in info.upstream:
        detail = f" ({step['detail']})" if step.get("detail") else ""
        yield f"1. `{step['stage']}`{detail}: `{public(step['path'])}`"
    yield f"1. `export`: {info.model['weights']}"


def _datasets(obj: Any) -> Iterator[dict[str, Any]]:
    """Every DataConfig-like mapping (one with a `dataset` key) in a config, depth first."""
    if isinstance(obj, dict):
        if isinstance(obj.get("dataset"), str):
            yield obj
        for value in obj.values():
            yield from _datasets(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _datasets(value)


def _training(info: CardInfo) -> Iterator[str]:
    """From the finetune manifest: mode, data sources, optimisation, LoRA shape, final losses."""
    manifest = info.training or {}
    config = manifest.get("config", {})
    mode = manifest.get("mode") or config.get("mode")
    if mode:
        merged = " (adapter merged into the full-precision base)" if mode in ("lora", "qlora") else ""
        yield f"- fine-tuning mode: {mode}{merged}"
    sources = (manifest.get("data") or {}).get("sources")
    if sources:
        for src in sources:
            repeat = f" x{src['repeat']:g}" if src.get("repeat", 1) != 1 else ""
            counts = f"{src.get('examples')} examples, {src.get('items')} items{repeat}"
            yield f"- data: `{public(src.get('name'))}` ({src.get('kind')}, {counts})"
    else:
        for data in _datasets(config):
            parts = [f"`{public(data['dataset'])}`"] + [f"{k} {data[k]}" for k in ("split", "subset", "target_lang") if data.get(k)]
            yield "- data: " + ", ".join(parts)
    train = config.get("train") or {}
    settings = [f"{k} {train[k]}" for k in ("epochs", "batch_size", "grad_accum", "lr", "scheduler") if k in train]
    if settings:
        yield "- optimisation: " + ", ".join(settings)
    lora = config.get("lora") or {}
    if mode in ("lora", "qlora") and lora:
        yield f"- LoRA: r {lora.get('r')}, alpha {lora.get('alpha')}, rsLoRA {lora.get('rslora')}, targets {lora.get('targets')}"
    kd = config.get("kd") or {}
    if kd.get("ratio"):
        yield f"- word-level KD: ratio {kd['ratio']}, temperature {kd.get('temperature')}, teacher `{public(kd.get('teacher'))}`"
    stats = manifest.get("training") or {}
    shown = [f"{k.replace('_', ' ')} {stats[k]:.4g}" if isinstance(stats[k], float) else f"{k.replace('_', ' ')} {stats[k]}"
             for k in ("steps", "epochs_completed", "final_train_loss", "final_dev_loss", "final_dev_chrf", "trainable_percent")
             if stats.get(k) is not None]
    if shown:
        yield "- result: " + ", ".join(shown)


def _scores(info: CardInfo) -> Iterator[str]:
    scores = (info.scores or {}).get("scores") or {}
    yield f"Scored by `stcompress evaluate` on {info.scores.get('segments')} segments ({info.scores.get('target_lang')}):"  # type: ignore[union-attr]
    yield ""
    yield "| metric | score | signature |"
    yield "|---|---:|---|"
    for name, s in scores.items():
        signature = str(s.get("signature", "")).replace("|", "\\|")  # a literal | would end the table cell
        yield f"| {name} | {s['score']:.2f} | `{signature}` |"


def _usage(info: CardInfo) -> list[str]:
    lang = language_name(info.target_lang)
    lines = [
        "```python",
        "from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration",
        "",
        f'model = Qwen2AudioForConditionalGeneration.from_pretrained("{info.name}", device_map="auto")',
        f'processor = AutoProcessor.from_pretrained("{info.name}")',
        'conversation = [{"role": "system", "content": "You are a professional translator."},',
        '                {"role": "user", "content": [{"type": "audio", "audio_url": "clip.wav"},',
        f'                                             {{"type": "text", "text": "Translate the English speech into '
        f'{lang}:"}}]}}]',
        "text = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)",
        'inputs = processor(text=text, audio=[audio_16khz_mono], sampling_rate=16000, return_tensors="pt").to(model.device)',
        "out = model.generate(**inputs, max_new_tokens=256, do_sample=False, repetition_penalty=1.0)",
        'print(processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0])',
        "```",
    ]
    if info.prompt:
        lines += ["", "The prompt exactly as rendered in training and inference:", "", "```text", info.prompt.rstrip(), "```"]
    return lines


def render_card(info: CardInfo) -> str:
    lines = _front_matter(info)
    lines += [f"# {info.name}", ""]
    lines += [
        f"A compressed Qwen2-Audio model for English speech -> {language_name(info.target_lang)} translation, exported "
        f"by stcompress {__version__} on {datetime.now(timezone.utc).date().isoformat()}. It loads with plain "
        "`transformers` (`Qwen2AudioForConditionalGeneration.from_pretrained`); stcompress is not needed to use it.",
        "",
    ]
    lines += list(_summary(info)) + ["", "## How it was made", ""] + list(_chain(info)) + [""]
    training = list(_training(info))
    if training:
        lines += ["## Training", ""] + training + [""]
    lines += ["## Size on disk per component", ""] + list(_sizes(info)) + [""]
    if info.measured or info.size_budget:
        lines += ["## Size as the IWSLT track counts it", ""] + list(_track_sizes(info)) + [""]
    lines += list(_precision(info))
    lines += list(_vocab(info))
    if info.scores:
        lines += ["## Scores", ""] + list(_scores(info)) + [""]
    lines += ["## Usage", ""] + _usage(info) + [""]
    check = info.reload_check
    lines += [
        "## Checks",
        "",
        f"Reloaded from disk and greedy-decoded {check.get('segments')} segments ({check.get('max_new_tokens')} new tokens): "
        + ("identical to the model in memory." if check.get("identical") else
           f"token agreement {check.get('token_agreement'):.4f} with the model in memory "
           f"(required >= {check.get('min_agreement')})."),
        "",
    ]
    full = check.get("vs_full_precision")
    if full:
        chrf = f", chrF {full['chrf']:.2f} against its outputs" if "chrf" in full else ""
        lines += [
            f"Quantized against the full-precision model it was quantized from, same segments: greedy token agreement "
            f"{full['token_agreement']:.4f}, {full['identical_segments']} of {check.get('segments')} segments identical{chrf}.",
            "",
        ]
    quant = info.model.get("quantization") or {}
    if quant.get("stored_as") == "compressed-tensors pack-quantized":
        lines += [
            f"Calibrated with auto-round ({quant.get('calibration_iters')} tuning steps per decoder layer) on up to "
            f"{quant.get('calibration_samples')} (clip, reference) pairs through the prompt below; stored in the "
            "compressed-tensors format: loading needs `pip install compressed-tensors` (vLLM loads it as it is).",
            "",
        ]
    return "\n".join(lines)
