"""`stcompress export`: a model users can ship, proven to reload.

Input: a finetune output (manifest.json with `mode` full | lora | qlora and `base_model`; the
weights in model/ or the peft adapter in adapter/) or any model directory. LoRA and QLoRA
adapters are merged into the base reloaded in full precision (`dtype`, bf16 by default): never
into a 4-bit model, which re-quantizes the merged weights (PAPER.md, "Known defects"). The output
directory is the model (safetensors, config, generation config, processor) plus a model card
(README.md) and manifest.json.

`quantize: nf4 | int8 | hqq | autoround` (stcompress.quantize: formats, bits per component) then stores the
merged model through the format's library: it is saved in `dtype`, reloaded through from_pretrained
with a quantization config, and saved again, so every tensor that is not quantized (embeddings,
norms, biases, the kept components) stays in `dtype`; the reference code saved ~5 GB of them in fp32. Every export is reloaded from disk with plain
from_pretrained and must decode like the model in memory: identically in full precision, with
greedy token agreement >= check_min_agreement when quantized (measured identical on CPU).
autoround (stcompress.calibrated) quantizes the merged model in memory on calibration pairs of
the run's data and writes compressed-tensors.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib.util
import json
import logging
import shutil
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers

from stcompress.artifacts import MANIFEST, atomic_write_json, atomic_write_text, build_manifest, path_identity, staged_output
from stcompress.config import ExportConfig, ModelConfig, to_dict
from stcompress.data.example import Example
from stcompress.data.sources import load_examples
from stcompress.errors import ConfigError, DataError, ModelError
from stcompress.metrics.efficiency import component_bytes, count_parameters, weight_bytes
from stcompress.model import arch
from stcompress.model.card import CardInfo, render_card
from stcompress.model.load import LoadedModel, check_model_dir, load_model, quantization_config, resolve_model_path
from stcompress.model.save import reload_check, save_model
from stcompress import budget, calibrated, quantize, sizes as size_model, vocab_trim
from stcompress.metrics import storage
from stcompress.model.layers import remove_decoder_layers
from stcompress.outputs import claims_output
from stcompress.prompt import PromptBuilder
from stcompress.translate import Hypothesis, Translator

log = logging.getLogger(__name__)

MODES = ("full", "lora", "qlora")
CARD = "README.md"
_ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_MAX_HOPS = 8  # upstream manifests followed for lineage (prune -> finetune -> ...)


@dataclass
class Source:
    """What to export: the weights to load and, for LoRA/QLoRA, the adapter to merge into them."""

    kind: str  # full | lora | qlora (a finetune output) or model (any model directory / hub id)
    model_path: str
    root: str  # the input: its resolved directory, or the hub id as given
    adapter: Path | None = None
    manifest: dict[str, Any] | None = None  # the finetune manifest, or the input model's own


# ---------------------------------------------------------------------------------------------
# Inputs


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: unreadable ({type(exc).__name__}); rerun the stage that wrote it") from None


def _finetune_mode(manifest: dict[str, Any]) -> str | None:
    return manifest.get("mode") or (manifest.get("config") or {}).get("mode")


def resolve_source(cfg: ExportConfig) -> Source:
    """Classify `cfg.input` and check that everything it needs exists, before anything loads."""
    path = Path(cfg.input).expanduser()
    manifest = _read_json(path / MANIFEST) if (path / MANIFEST).is_file() else None
    if manifest is not None and (manifest.get("stage") == "finetune" or _finetune_mode(manifest)):
        return _finetune_source(cfg, path, manifest)
    if path.is_dir() and not (path / "config.json").is_file():
        if (path / "adapter").is_dir() or (path / "model").is_dir():
            raise ModelError(
                f"input: {path} has no {MANIFEST} (the fine-tuning run did not finish); "
                "rerun stcompress finetune, or point input at a model directory"
            )
        raise ModelError(f"input: {path} is neither a finetune output nor a model directory; give one of those")
    if _is_quantized(path):
        raise ModelError(f"input: {path} is already a 4-bit model; export from its full-precision model")
    try:
        resolved = resolve_model_path(str(path) if path.exists() else cfg.input)
        return Source("model", resolved, str(path.resolve()) if path.exists() else resolved, manifest=manifest)
    except ModelError as exc:
        raise ModelError(str(exc).replace("model.path:", "input:", 1)) from None


def _finetune_source(cfg: ExportConfig, path: Path, manifest: dict[str, Any]) -> Source:
    mode = _finetune_mode(manifest)
    if mode not in MODES:
        raise ModelError(
            f"input: {path / MANIFEST} records mode {mode!r}; expected one of {', '.join(MODES)} (rerun stcompress finetune)"
        )
    if mode == "full":
        model_dir = path / "model"
        if not model_dir.is_dir():
            raise ModelError(
                f"input: {model_dir} is missing (a full fine-tuning output keeps its weights there); rerun stcompress finetune"
            )
        try:
            check_model_dir(model_dir)
        except ModelError as exc:
            raise ModelError(str(exc).replace("model.path:", "input:", 1)) from None
        return Source("full", str(model_dir), str(path.resolve()), manifest=manifest)
    adapter = path / "adapter"
    if not (adapter / "adapter_config.json").is_file() or not any((adapter / w).is_file() for w in _ADAPTER_WEIGHTS):
        raise ModelError(
            f"input: {adapter} has no adapter_config.json or adapter weights ({' / '.join(_ADAPTER_WEIGHTS)}); "
            "the fine-tuning run did not save its adapter, rerun stcompress finetune"
        )
    return Source(mode, _base_model(cfg, path, manifest), str(path.resolve()), adapter=adapter, manifest=manifest)


def _base_model(cfg: ExportConfig, path: Path, manifest: dict[str, Any]) -> str:
    base = cfg.base_model or manifest.get("base_model") or ((manifest.get("config") or {}).get("model") or {}).get("path")
    item = "base_model" + ("" if cfg.base_model else f" (from {path / MANIFEST})")
    if not base:
        raise ModelError(
            f"{item}: the finetune manifest names no base model; pass --base-model with the model the adapter was trained on"
        )
    local = Path(base).expanduser()
    if not base.startswith("builtin:") and (local.is_absolute() or base.startswith((".", "~")) or local.exists()):
        if not local.is_dir():
            raise ModelError(f"{item}: {base} does not exist; pass --base-model with the model the adapter was trained on")
    try:
        resolved = resolve_model_path(base)
    except ModelError as exc:
        raise ModelError(str(exc).replace("model.path:", f"{item}:", 1)) from None
    if _is_quantized(Path(resolved)):
        raise ModelError(
            f"{item}: {base} is a 4-bit model and merging into it re-quantizes; pass --base-model with its full-precision model"
        )
    return resolved


def _is_quantized(path: Path) -> bool:
    config = path / "config.json"
    return config.is_file() and "quantization_config" in _read_json(config)


def check_bitsandbytes(cfg: ExportConfig) -> None:
    """The format's library is installed and this transformers reloads it (stcompress.quantize)."""
    quantize.check_library(cfg.quantize)


def check_examples(cfg: ExportConfig) -> list[Example]:
    data = dataclasses.replace(cfg.data, limit=min(cfg.data.limit or cfg.check_segments, cfg.check_segments))
    examples = load_examples(data, on_error="skip").examples
    if not examples:
        raise DataError("data: no segments for the reload check; point data at a dataset with audio")
    return examples


# ---------------------------------------------------------------------------------------------
# Lineage: what upstream stages recorded (removed layers, layer map, the original model)


def lineage(source: Source) -> dict[str, Any]:
    """Follow `base_model` links through upstream manifests: the stages (oldest first, as finetune
    records them in `upstream`), the nearest record of removed layers, and the original model."""
    chain: list[dict[str, Any]] = []
    found: dict[str, Any] = {}
    manifest, where = source.manifest, source.root
    origin = source.model_path
    seen: set[str] = set()
    for _ in range(_MAX_HOPS):
        if manifest is None:
            break
        step = {"stage": manifest.get("stage", "?"), "path": where}
        if manifest.get("stage") == "prune" and manifest.get("removed_layers"):
            step["detail"] = f"removed decoder layers {manifest['removed_layers']}"
        elif _finetune_mode(manifest):
            step["detail"] = _finetune_mode(manifest)
        chain.append(step)
        for key in ("removed_layers", "layer_map", "encoder_layer_map", "original_model", "prompt_config"):
            if manifest.get(key) is not None and key not in found:
                found[key] = manifest[key]
        if manifest.get("stage") == "finetune":
            found.setdefault("finetune", manifest)  # what the model was trained on, for the card
            found.setdefault("finetunes", []).append(manifest)  # every training run: trim_vocab's texts
        base = manifest.get("base_model") or ((manifest.get("config") or {}).get("model") or {}).get("path")
        if not base or base in seen:
            break
        seen.add(base)
        origin = base
        nxt = Path(base).expanduser() / MANIFEST
        manifest, where = (_read_json(nxt), base) if nxt.is_file() else (None, None)
    found["original_model"] = found.get("original_model") or origin
    return {"upstream": chain[::-1], **found}


# ---------------------------------------------------------------------------------------------
# Merge, quantize, check


def merge_adapter(loaded: LoadedModel, adapter: Path) -> None:
    """Apply a peft adapter to the full-precision model in place and fold it into the weights.

    An adapter saved under the other transformers family's module paths is renamed to this
    one's first; peft would otherwise leave every unmatched LoRA weight at its initial value
    (a warning, and a merge that silently does nothing).
    """
    from peft import PeftModel, get_peft_model_state_dict
    from peft.utils import load_peft_weights

    weights = load_peft_weights(str(adapter), device="cpu")
    layout = arch.layout(loaded.model)
    renamed = {arch.rename_for_layout(k, layout): v for k, v in weights.items()}
    with tempfile.TemporaryDirectory(prefix="stcompress-adapter-") as tmp:
        source = adapter
        if renamed.keys() != weights.keys():
            log.warning("%s: adapter saved with the other transformers layout; renamed its keys to %s", adapter, layout)
            from safetensors.torch import save_file

            shutil.copy(adapter / "adapter_config.json", Path(tmp) / "adapter_config.json")
            save_file({k: v.contiguous() for k, v in renamed.items()}, str(Path(tmp) / "adapter_model.safetensors"))
            source = Path(tmp)
        try:
            with warnings.catch_warnings():  # missing keys are checked below, with the fix in the message
                warnings.filterwarnings("ignore", message="Found missing adapter keys")
                peft_model = PeftModel.from_pretrained(loaded.model, str(source))
        except (ValueError, KeyError, RuntimeError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise ModelError(
                f"input: the adapter in {adapter} does not fit the base model {loaded.path} ({first}); "
                "pass --base-model with the model it was trained on"
            ) from None
    expected = set(get_peft_model_state_dict(peft_model))
    missing = sorted(expected - renamed.keys())
    if missing:
        raise ModelError(
            f"input: {len(missing)} of {len(expected)} LoRA weights the base model {loaded.path} needs are not in {adapter} "
            f"(e.g. {missing[0]}); pass --base-model with the model the adapter was trained on"
        )
    loaded.model = peft_model.merge_and_unload().eval()
    log.info("merged the adapter %s (%d tensors) into %s (%s)", adapter, len(renamed), loaded.path, loaded.dtype)


def _dtype(name: str) -> torch.dtype:
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def nf4_config(cfg: ExportConfig) -> Any:
    """The paper's NF4 config, with the components to keep out of 4-bit named in both layouts."""
    q = quantization_config(_dtype(cfg.dtype))
    q.bnb_4bit_use_double_quant = cfg.double_quant
    q.llm_int8_skip_modules = arch.quantization_skip_patterns(cfg.keep_unquantized)
    return q


def _translate(loaded: LoadedModel, examples: Sequence[Example], cfg: ExportConfig) -> list[Hypothesis]:
    gen = dataclasses.replace(cfg.generation, max_new_tokens=cfg.check_max_new_tokens, batch_size=len(examples))
    return Translator(loaded.model, loaded.processor, cfg.prompt, gen, progress=False).translate(examples)


def token_agreement(a: Sequence[Hypothesis], b: Sequence[Hypothesis], tokenizer: Any) -> float:
    """Share of greedy tokens that agree: per segment, the common prefix of the two outputs'
    tokens over the longer output (after the first difference greedy outputs part ways)."""
    agree = total = 0
    for x, y in zip(a, b):
        tx = tokenizer(x.text, add_special_tokens=False)["input_ids"]
        ty = tokenizer(y.text, add_special_tokens=False)["input_ids"]
        prefix = next((i for i, (p, q) in enumerate(zip(tx, ty)) if p != q), min(len(tx), len(ty)))
        agree += prefix
        total += max(len(tx), len(ty))
    return agree / total if total else 1.0


def chrf_agreement(hypotheses: Sequence[Hypothesis], references: Sequence[Hypothesis]) -> float:
    """chrF of one model's outputs scored against another's (100: the same text)."""
    from sacrebleu.metrics import CHRF

    return round(CHRF().corpus_score([h.text for h in hypotheses], [[r.text for r in references]]).score, 4)


def quantized_reload_check(
    loaded: LoadedModel, directory: Path, examples: Sequence[Example], cfg: ExportConfig
) -> tuple[dict[str, Any], list[Hypothesis]]:
    """Reload the quantized export with plain from_pretrained; its greedy output must agree with the
    in-memory quantized model to check_min_agreement. Returns the check and the in-memory outputs."""
    before = _translate(loaded, examples, cfg)
    # transformers 4.57's HQQ loader computes in float32 whatever dtype is asked: load it so.
    dtype = "float32" if cfg.quantize == "hqq" else cfg.dtype
    device_map = str(loaded.device) if cfg.quantize == "int8" else None  # int8 models refuse .to(device)
    reloaded = load_model(ModelConfig(path=str(directory), dtype=dtype, device=str(loaded.device), device_map=device_map))
    after = _translate(reloaded, examples, cfg)
    del reloaded
    identical = sum((x.text, x.n_tokens) == (y.text, y.n_tokens) for x, y in zip(before, after))
    agreement = token_agreement(before, after, loaded.processor.tokenizer)
    result = {
        "segments": len(examples), "max_new_tokens": cfg.check_max_new_tokens, "identical": identical == len(examples),
        "identical_segments": identical, "token_agreement": round(agreement, 6), "min_agreement": cfg.check_min_agreement,
        "chrf": chrf_agreement(after, before),
    }
    if agreement < cfg.check_min_agreement:
        raise ModelError(
            f"reload check: the {cfg.quantize} model saved in {directory} decodes differently from the model in memory "
            f"(token agreement {agreement:.4f} < check_min_agreement {cfg.check_min_agreement}; {identical} of "
            f"{len(examples)} segments identical); report this with the manifest, or lower check_min_agreement"
        )
    log.info(f"{cfg.quantize} reload check passed: token agreement %.4f, %d/%d segments identical", agreement, identical, len(examples))
    return result, before


def describe(loaded: LoadedModel, cfg: ExportConfig, quantized: bool, parameters: int | None = None) -> dict[str, Any]:
    """`parameters`: the true weight count, counted before quantization (HQQ packs its weights)."""
    info = {
        "decoder_layers": arch.num_decoder_layers(loaded.model),
        "parameters": parameters if parameters is not None else count_parameters(loaded.model),
        "dtype": cfg.dtype,
        "quantization": None,
        "weights": f"{cfg.dtype} safetensors",
    }
    chosen = quantize.component_bits(cfg.quantize, cfg.bits, cfg.keep_unquantized)
    group = quantize.group_size(cfg.quantize, cfg.group_size)
    info["precision"] = quantize.describe_bits(cfg.quantize, chosen, cfg.dtype, group)
    if quantized and cfg.quantize != "nf4":
        kept = [c for c, b in chosen.items() if b == quantize.KEEP]
        method = {"auto_round": "auto-round"}.get(quantize._LIBRARY[cfg.quantize], quantize._LIBRARY[cfg.quantize])
        info["quantization"] = {"method": method, "format": cfg.quantize, "bits": chosen,
                                "compute_dtype": cfg.dtype, "kept_in_dtype": kept}
        if cfg.quantize == "autoround":
            info["quantization"] |= {"stored_as": "compressed-tensors pack-quantized", "group_size": group,
                                     "calibration_samples": cfg.calibration_samples, "calibration_iters": cfg.calibration_iters}
        info["weights"] = "; ".join(f"{c} {d}" for c, d in info["precision"]["stored_as"].items()) + (
            f"; all other tensors (norms, biases, convolutions) in {cfg.dtype}")
    elif quantized:
        kept = ["embed_tokens", *(c for c, b in chosen.items() if b == quantize.KEEP and c != "embed_tokens")]
        info["quantization"] = {
            "method": "bitsandbytes", "quant_type": "nf4", "double_quant": cfg.double_quant,
            "compute_dtype": cfg.dtype, "kept_in_dtype": kept,
        }
        info["weights"] = (
            f"NF4 (bitsandbytes) linear layers; {', '.join(kept)} and all other tensors (norms, biases, convolutions) "
            f"in {cfg.dtype}"
        )
    return info


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def library_config(loaded: LoadedModel, cfg: ExportConfig) -> Any:
    """The format's transformers quantization config with the configured bits per component."""
    chosen = quantize.component_bits(cfg.quantize, cfg.bits, cfg.keep_unquantized)
    q = quantize.library_config(cfg.quantize, chosen, loaded.model, _dtype(cfg.dtype), double_quant=cfg.double_quant,
                                group_size=quantize.group_size(cfg.quantize, cfg.group_size))
    if cfg.quantize == "nf4":  # the paper's config, kept components from the bits
        nf4, nf4.llm_int8_skip_modules = nf4_config(cfg), q.llm_int8_skip_modules
        return nf4
    return q


def export_nf4(
    loaded: LoadedModel, out: Path, examples: Sequence[Example], cfg: ExportConfig
) -> tuple[LoadedModel, dict[str, Any]]:
    """Full precision -> temporary save -> from_pretrained with the format's config -> save to
    `out` -> check (any quantize format, nf4 the first).

    The quantized model is saved before it runs anything: on CPU bitsandbytes repacks 4-bit weights
    on first use. Returns the in-memory quantized model and the check (with agreement to full
    precision).
    """
    reference = _translate(loaded, examples, cfg)
    if cfg.quantize == "hqq":
        chosen = quantize.component_bits(cfg.quantize, cfg.bits, cfg.keep_unquantized)
        quantize.hqq_quantize(loaded.model, chosen, quantize.group_size("hqq", cfg.group_size), _dtype(cfg.dtype))
        save_model(loaded.model, loaded.processor, out)
        quantize.hqq_compute_as_reloaded(loaded.model)
        return _checked(loaded, out, examples, cfg, reference)
    q = library_config(loaded, cfg)
    tmp = Path(tempfile.mkdtemp(prefix=".full-precision-", dir=out))  # inside the staging dir: a kill leaves nothing beside
    try:
        save_model(loaded.model, loaded.processor, tmp)
        device = str(loaded.device)
        loaded.model = None  # the caller's reference goes too: full precision and 4-bit never coexist
        _release_memory()
        quantized = load_model(ModelConfig(path=str(tmp), dtype=cfg.dtype, device=device), quantization=q)
        save_model(quantized.model, quantized.processor, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _checked(quantized, out, examples, cfg, reference)


def export_autoround(loaded: LoadedModel, out: Path, examples: Sequence[Example], calibration: Sequence[Example],
                     cfg: ExportConfig) -> tuple[LoadedModel, dict[str, Any], dict[str, Any]]:
    """Calibrate and quantize the decoder in memory (auto-round), write compressed-tensors to `out`,
    check the reload. Returns the model, the check and the calibration record."""
    reference = _translate(loaded, examples, cfg)
    chosen = quantize.component_bits(cfg.quantize, cfg.bits, cfg.keep_unquantized)
    t0 = time.perf_counter()
    batches = calibrated.calibration_batches(loaded.processor, calibration, cfg)
    record = calibrated.autoround_quantize(loaded.model, loaded.processor, batches, chosen["decoder_layers"],
                                           quantize.group_size(cfg.quantize, cfg.group_size), cfg.calibration_iters, out)
    data = calibrated.calibration_data(cfg)
    record |= {"dataset": data.dataset, "subset": data.subset, "clips": len(calibration),
               "tokens": sum(int(b["input_ids"].numel()) for b in batches),
               "audio_tokens": sum(int((b["input_ids"] == arch.audio_token_id(loaded.model)).sum()) for b in batches),
               "seconds": round(time.perf_counter() - t0, 3)}
    loaded, check = _checked(loaded, out, examples, cfg, reference)
    return loaded, check, record


def _checked(quantized: LoadedModel, out: Path, examples: Sequence[Example], cfg: ExportConfig,
             reference: list[Hypothesis]) -> tuple[LoadedModel, dict[str, Any]]:
    check, in_memory = quantized_reload_check(quantized, out, examples, cfg)
    check["vs_full_precision"] = {
        "identical_segments": sum(a.text == b.text for a, b in zip(reference, in_memory)),
        "token_agreement": round(token_agreement(reference, in_memory, quantized.processor.tokenizer), 6),
        "chrf": chrf_agreement(in_memory, reference),
    }
    return quantized, check


def trim_vocabulary(loaded: LoadedModel, found: vocab_trim.KeptTexts, examples: Sequence[Example], cfg: ExportConfig,
                    prompt: str) -> dict[str, Any]:
    """Trim before quantizing; the record says how the trimmed model's greedy output compares with
    the untrimmed one's on the check segments (equal whenever the untrimmed tokens are all kept)."""
    before = _translate(loaded, examples, cfg)
    record = vocab_trim.trim_model(loaded, [*found.texts, prompt], keep_first=cfg.vocab.keep_first)
    after = _translate(loaded, examples, cfg)
    identical = sum(a.text == b.text for a, b in zip(before, after))
    record |= {"source": found.origin, "sources": found.sources, "vs_untrimmed": {
        "segments": len(examples), "identical_segments": identical,
        "token_agreement": round(token_agreement(before, after, loaded.processor.tokenizer), 6)}}
    if identical < len(examples):
        log.warning("trim_vocab: %d of %d check segments decode differently after trimming (the untrimmed model "
                    "picked tokens outside the kept set)", len(examples) - identical, len(examples))
    return record


def _trim_sizes(trim: dict[str, Any], out: Path, cfg: ExportConfig, measured: int) -> dict[str, Any]:
    """Bytes of this export's format before trimming (predicted: stcompress.sizes) and after (on disk)."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(out))
    chosen = quantize.component_bits(cfg.quantize, cfg.bits, cfg.keep_unquantized)
    predict = lambda rows: size_model.predict(config, cfg.quantize, chosen, cfg.dtype, cfg.group_size, vocab_size=rows)  # noqa: E731
    return {"before_predicted": predict(trim["vocab_size_before"])["total"],
            "after_predicted": predict(trim["vocab_size_after"])["total"], "after": measured}


# ---------------------------------------------------------------------------------------------
# The stage


def _scores(cfg: ExportConfig) -> dict[str, Any] | None:
    if not cfg.scores:
        return None
    path = Path(cfg.scores)
    path = path / "scores.json" if path.is_dir() else path
    if not path.is_file():
        raise ConfigError(
            [f"scores: {cfg.scores} is not an evaluate output or a scores.json; run stcompress evaluate or drop the option"]
        )
    return _read_json(path)


def _inputs(source: Source) -> dict[str, Any]:
    inputs = {"model": path_identity(source.model_path)}
    if source.adapter is not None:
        inputs["adapter"] = path_identity(source.adapter)
        inputs["finetune"] = path_identity(source.adapter.parent / MANIFEST)
    return inputs


def _target_lang(source: Source, cfg: ExportConfig) -> str:
    """The language the model was trained for, as upstream recorded it; else data.target_lang."""
    if (source.manifest or {}).get("target_lang"):
        return source.manifest["target_lang"]  # type: ignore[index]
    data = ((source.manifest or {}).get("config") or {}).get("data")
    data = data[0] if isinstance(data, list) and data else data
    return data.get("target_lang") or cfg.data.target_lang if isinstance(data, dict) else cfg.data.target_lang


def _prompt(source: Source, cfg: ExportConfig, processor: Any) -> str:
    """The prompt the model was trained with (its manifest's), else this config's, rendered."""
    return (source.manifest or {}).get("prompt") or PromptBuilder(processor, cfg.prompt).render(_target_lang(source, cfg))


def _write_records(out: Path, cfg: ExportConfig, source: Source, origin: dict[str, Any], loaded: LoadedModel,
                   check: dict[str, Any], timings: dict[str, float], parameters: int | None = None,
                   trim: dict[str, Any] | None = None, trim_inputs: dict[str, Any] | None = None,
                   calibration: dict[str, Any] | None = None, measured: dict[str, Any] | None = None,
                   picked: dict[str, Any] | None = None) -> dict[str, Any]:
    """Model card and manifest beside the weights; returns the model description."""
    scores = _scores(cfg)
    lang = _target_lang(source, cfg)
    model = describe(loaded, cfg, quantized=cfg.quantize != "none", parameters=parameters)
    sizes = component_bytes(out)
    prompt = _prompt(source, cfg, loaded.processor)
    if trim is not None:
        trim["bytes"] = _trim_sizes(trim, out, cfg, sizes["total"])
    tags = {"pruned": bool(origin.get("removed_layers")), "4-bit": cfg.quantize in ("nf4", "autoround"),
            cfg.quantize: cfg.quantize in ("int8", "hqq", "autoround"), "compressed-tensors": cfg.quantize == "autoround",
            "lora-merged": source.adapter is not None, "vocab-trimmed": trim is not None}
    card = CardInfo(
        name=Path(cfg.output).name, target_lang=lang, base_model=origin["original_model"], upstream=origin["upstream"],
        model=model, sizes=sizes, reload_check=check, prompt=prompt, removed_layers=origin.get("removed_layers"),
        layer_map=origin.get("layer_map"), training=origin.get("finetune"), scores=scores,
        extra_tags=[t for t, on in tags.items() if on], vocab=trim, measured=measured, size_budget=picked,
    )
    atomic_write_text(out / CARD, render_card(card))
    inputs = _inputs(source) | ({"importance": path_identity(Path(cfg.importance) / MANIFEST)} if cfg.importance else {})
    manifest = build_manifest(
        "export", to_dict(cfg), inputs | (trim_inputs or {}), timings,
        source={"kind": source.kind, "model": source.model_path, "adapter": str(source.adapter) if source.adapter else None},
        base_model=source.root, original_model=origin["original_model"], upstream=origin["upstream"],
        removed_layers=origin.get("removed_layers"), layer_map=origin.get("layer_map"),
        encoder_layer_map=origin.get("encoder_layer_map"), target_lang=lang, prompt=prompt,
        prompt_config=origin.get("prompt_config"),
        model=model | {"path": str(Path(cfg.output).resolve()), "bytes_on_disk": sizes["total"]},
        size=sizes, reload_check=check, scores=(scores or {}).get("scores"), vocab=trim,
        measured_bytes=measured, size_budget=picked, **({"calibration": calibration} if calibration else {}),
    )
    atomic_write_json(out / MANIFEST, manifest)
    return model


def _remove_layers(loaded: LoadedModel, plan: budget.Plan, origin: dict[str, Any]) -> dict[str, Any]:
    """Drop the plan's layers (original numbering) as prune does; the lineage with the new layer map."""
    if not plan.removed:
        return origin
    current = [plan.present.index(i) for i in plan.removed]
    keep = remove_decoder_layers(loaded.model, current)
    log.info("removed decoder layers %s (original numbering) of the importance order", sorted(plan.removed))
    return origin | {"removed_layers": sorted({*(origin.get("removed_layers") or []), *plan.removed}),
                     "layer_map": [plan.present[i] for i in keep]}


def measure(out: Path, cfg: ExportConfig, device: str) -> dict[str, Any]:
    """Bytes as the track counts them: the *.safetensors files, and torch.save of the state dict of the
    export loaded back with plain from_pretrained (in the dtype it computes in)."""
    dtype = budget.reload_dtype(cfg.quantize, cfg.dtype)
    device_map = device if cfg.quantize == "int8" else None
    reloaded = load_model(ModelConfig(path=str(out), dtype=dtype, device=device, device_map=device_map))
    saved = storage.torch_save_bytes(reloaded.model)
    del reloaded
    _release_memory()
    return {"safetensors": storage.safetensors_bytes(out), "torch_save": saved,
            "torch_save_loaded_as": f"from_pretrained(dtype={dtype}); torch.save(model.state_dict(), 'archive.pt')"}


@claims_output()
def run(cfg: ExportConfig, *, progress: bool = True) -> Path:
    if problems := cfg.problems():
        raise ConfigError(problems)
    t0 = time.perf_counter()
    check_bitsandbytes(cfg)
    source = resolve_source(cfg)
    _scores(cfg)  # fail on a bad --scores before loading anything
    examples = check_examples(cfg)
    calibration = calibrated.calibration_examples(cfg) if cfg.quantize == "autoround" else []
    origin = lineage(source)
    kept = vocab_trim.kept_texts(cfg.vocab, origin.get("finetunes", []), cfg.data) if cfg.trim_vocab else None
    rows = None
    if kept and (cfg.size_budget or cfg.quantize == "int8"):  # the picker sizes every candidate with the
        processor = transformers.AutoProcessor.from_pretrained(source.model_path)  # trimmed vocabulary; no weights yet
        rows = vocab_trim.predicted_rows(source.model_path, [*kept.texts, _prompt(source, cfg, processor)],
                                         keep_first=cfg.vocab.keep_first)
    model_config = transformers.AutoConfig.from_pretrained(source.model_path)
    cfg, plan = budget.plan_export(cfg, model_config, origin, rows)
    check_bitsandbytes(cfg)  # the picked format's library
    chosen = quantize.component_bits(cfg.quantize, cfg.bits, cfg.keep_unquantized)
    if problems := quantize.int8_problems(cfg.quantize, chosen, model_config, vocab_size=rows):
        raise ConfigError(problems)  # a model that would fail at serving batch sizes on CUDA: refused before loading
    loaded = load_model(ModelConfig(path=source.model_path, dtype=cfg.dtype, device=cfg.device))
    if source.adapter is not None:
        merge_adapter(loaded, source.adapter)
    origin = _remove_layers(loaded, plan, origin)
    timings = {"load_and_merge": time.perf_counter() - t0}
    with staged_output(cfg.output) as out:
        t1 = time.perf_counter()
        trim = trim_vocabulary(loaded, kept, examples, cfg, _prompt(source, cfg, loaded.processor)) if kept else None
        if trim is not None:
            timings["trim_vocab"] = time.perf_counter() - t1
        parameters = count_parameters(loaded.model)
        device = str(loaded.device)
        record = None
        if cfg.quantize == "autoround":
            loaded, check, record = export_autoround(loaded, out, examples, calibration, cfg)
        elif cfg.quantize != "none":
            loaded, check = export_nf4(loaded, out, examples, cfg)
        else:
            save_model(loaded.model, loaded.processor, out)
            check = reload_check(loaded.model, loaded.processor, out, examples, max_new_tokens=cfg.check_max_new_tokens,
                                 generation=cfg.generation)
        timings["save_and_check"] = time.perf_counter() - t1
        measured = measure(out, cfg, device)
        if cfg.size_budget:
            budget.check_fit(cfg, measured)  # raises inside staged_output: nothing is left that looks complete
        timings["total"] = time.perf_counter() - t0
        model = _write_records(out, cfg, source, origin, loaded, check, timings, parameters, trim,
                               kept.inputs if kept else None, calibration=record, measured=measured,
                               picked=plan.record)
    log.info("exported %s (%s, %d decoder layers, %s) -> %s", source.kind, model["weights"], model["decoder_layers"],
             f"{weight_bytes(cfg.output) / 1e9:.3f} GB", cfg.output)
    return Path(cfg.output)
