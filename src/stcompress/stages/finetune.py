"""`stcompress finetune`: full fine-tuning, LoRA or QLoRA on speech-translation pairs.

Output directory (written atomically; `export` reads it):

    model/          mode full: a complete model (safetensors, config, generation config, processor),
                    reload-checked and loadable with plain from_pretrained
    adapter/        mode lora / qlora: peft's adapter_config.json + adapter_model.safetensors, and
                    the processor files
    history.jsonl   one row per logged training window ("kind": "train") and dev evaluation ("dev")
    manifest.json   mode, base_model (resolved; removed_layers / layer_map carried from an upstream
                    prune or finetune manifest), prompt, languages, data counts, training stats,
                    best checkpoint

Checkpoints live beside the output (`<output>.checkpoints`, train.checkpoint_dir) until the run
succeeds; rerunning the same command after a kill resumes from the last one.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from stcompress.artifacts import (
    MANIFEST,
    atomic_write_json,
    content_identity,
    build_manifest,
    path_identity,
    read_manifest,
    staged_output,
    write_jsonl,
)
from stcompress.config import DataConfig, DatasetMix, FinetuneConfig, ModelConfig, to_dict
from stcompress.data.distilled import distill_data_config, read_distilled
from stcompress.data.example import Example
from stcompress.data.sources import load_examples
from stcompress.data.training import TrainItem, distilled_items, reference_items, repeat_items
from stcompress.errors import ConfigError, DataError, ModelError
from stcompress.model import arch
from stcompress.model.load import LoadedModel, load_model
from stcompress.model.save import make_processor_files_portable, reload_check, save_model
from stcompress.outputs import claims_output
from stcompress.prompt import PromptBuilder
from stcompress.stages.translate import data_identity
from stcompress.training.checkpoint import TrainerState, check_inputs, check_resumable, read_state, resume_config
from stcompress.training.collate import Collator, TowerCache, encode_items
from stcompress.training import fsdp
from stcompress.training.forward import TranslationLM, evaluating, vocab_size
from stcompress.training.loop import TrainData, Trainer
from stcompress.training.lora import apply_lora, setup_full, trainable_report

log = logging.getLogger(__name__)

HISTORY = "history.jsonl"
_CARRIED = ("removed_layers", "layer_map", "encoder_layer_map")


# ---------------------------------------------------------------------------------------------
# Inputs: base model lineage, training and dev data


def resolve_base(path: str, *, item: str = "model.path") -> tuple[str, dict[str, Any]]:
    """The model directory to load for `path`, and what upstream stcompress manifests recorded.

    A prune output is itself a model directory; a full finetune output holds its model in model/;
    a LoRA finetune output (adapter only) must be merged by `stcompress export` first.
    """
    p = Path(path).expanduser()
    if path.startswith("builtin:") or not p.is_dir():
        return path, {}
    root = p if (p / MANIFEST).is_file() else p.parent if p.name == "model" and (p.parent / MANIFEST).is_file() else None
    if root is None:
        return str(p.resolve()), {}
    manifest = read_manifest(root)
    if (root / "model" / "config.json").is_file():
        model_dir = root / "model"
    elif (root / "config.json").is_file():
        model_dir = root
    elif (root / "adapter").is_dir():
        raise ModelError(f"{item}: {path} is a {manifest.get('mode', 'LoRA')} fine-tune output (an adapter, no model); "
                         f"merge it first with `stcompress export --input {path}` and fine-tune the exported model")
    else:
        raise ModelError(f"{item}: {path} is a {manifest.get('stage')} output without a model; point at a model directory")
    lineage = {k: manifest[k] for k in _CARRIED if manifest.get(k) is not None}
    lineage["original_model"] = manifest.get("original_model") or manifest.get("base_model")
    lineage["upstream"] = [*manifest.get("upstream", []), {"stage": manifest.get("stage"), "path": str(root.resolve())}]
    if manifest.get("prompt_config"):
        lineage["upstream_prompt_config"] = manifest["prompt_config"]
    return str(model_dir.resolve()), lineage


def sources(cfg: FinetuneConfig) -> tuple[DatasetMix, ...]:
    return cfg.datasets or (DatasetMix(data=cfg.data),)


def load_training_items(cfg: FinetuneConfig) -> tuple[list[TrainItem], list[dict[str, Any]], list[dict[str, Any]]]:
    """(mixed items, one report per source, input identities); each reference is its own item."""
    items: list[TrainItem] = []
    report, identities = [], []
    for i, mix in enumerate(sources(cfg)):
        if mix.distilled:
            got = distilled_items(mix.distilled, on_error=cfg.on_error)
            name, examples = mix.name or mix.distilled, len({id(it.example) for it in got})
            identities.append(path_identity(Path(mix.distilled) / "examples.jsonl"))
        else:
            loaded = load_examples(mix.data, on_error=cfg.on_error, require_references=True)
            got, name, examples = reference_items(loaded.examples), mix.name or mix.data.dataset, len(loaded.examples)
            identities.append(data_identity(mix.data))
        picked = repeat_items(got, mix.repeat, seed=cfg.train.seed + i)
        report.append({"name": name, "kind": "distilled" if mix.distilled else "references", "examples": examples,
                       "items": len(got), "repeat": mix.repeat, "items_after_repeat": len(picked)})
        items.extend(picked)
    if not items:
        shown = "; ".join(f"{r['name']}: {r['items']} items x {r['repeat']}" for r in report)
        raise DataError(f"datasets: no training items ({shown}); check data.dataset, subset, limit, references "
                        "and the repeat factors")
    return items, report, identities


def dev_data_config(cfg: FinetuneConfig) -> DataConfig | None:
    """Where the dev split comes from (DevConfig.dataset), or None for no dev evaluation."""
    if cfg.dev.dataset == "none":
        return None
    first = sources(cfg)[0]
    base = first.data
    if first.distilled:
        base = distill_data_config(read_distilled(first.distilled)[1], Path(first.distilled))
    if cfg.dev.dataset == "auto":
        if base.subset == "train" and base.dev_size > 0:
            return dataclasses.replace(base, subset="dev", limit=cfg.dev.limit)
        return None
    return dataclasses.replace(base, dataset=cfg.dev.dataset, format="auto", subset="all", limit=cfg.dev.limit)


# ---------------------------------------------------------------------------------------------
# Models


def make_accelerator(cfg: FinetuneConfig) -> Any:
    from accelerate import Accelerator

    cpu = cfg.model.device == "cpu" or not torch.cuda.is_available()
    precision = cfg.train.mixed_precision
    if precision == "auto":
        precision = "no" if cpu else "bf16"
    # The scheduler steps once per real optimizer step (never per process); models are placed by
    # load_model (4-bit models cannot be moved afterwards).
    sharding = fsdp.plugin(cfg)
    accelerator = Accelerator(cpu=cpu, mixed_precision=precision, step_scheduler_with_optimizer=False,
                              device_placement=False, fsdp_plugin=sharding)
    fsdp.enable_on_cpu(accelerator, sharding)
    return accelerator


def load_student(cfg: FinetuneConfig, path: str, device: torch.device) -> LoadedModel:
    """fp32 master weights for full fine-tuning (bf16 autocast on GPU); bf16 or NF4 bases for LoRA."""
    dtype = load_student_dtype(cfg)
    device_name = str(device) if cfg.model.device == "auto" else cfg.model.device
    quantization = None
    if cfg.mode == "qlora":
        from stcompress.model.load import quantization_config

        compute = torch.bfloat16 if device.type == "cuda" else torch.float32
        keep = None if tuple(cfg.lora.keep_unquantized) == ("lm_head",) else cfg.lora.keep_unquantized  # transformers' own default
        quantization = quantization_config(compute, keep=keep)
    return load_model(dataclasses.replace(cfg.model, path=path, dtype=dtype, device=device_name,
                                          load_in_4bit=cfg.mode == "qlora"), quantization=quantization)


def prepare_student(cfg: FinetuneConfig, loaded: LoadedModel) -> tuple[torch.nn.Module, dict[str, Any] | None]:
    t = cfg.train
    if cfg.mode == "full":
        return setup_full(loaded.model, freeze_audio_tower=t.freeze_audio_tower,
                          freeze_language_model=t.freeze_language_model,
                          gradient_checkpointing=t.gradient_checkpointing), None
    model, info = apply_lora(loaded.model, cfg.lora, quantized=cfg.mode == "qlora",
                             audio_tower=cfg.lora.audio_tower and not t.freeze_audio_tower,
                             gradient_checkpointing=t.gradient_checkpointing)
    return model, info


def load_teacher(cfg: FinetuneConfig, device: torch.device, student: torch.nn.Module) -> tuple[TranslationLM | None, str | None]:
    if cfg.kd.ratio == 0 or not cfg.kd.teacher:
        return None, None
    path, _ = resolve_base(cfg.kd.teacher, item="kd.teacher")
    loaded = load_model(ModelConfig(path=path, device=str(device), load_in_4bit=cfg.kd.teacher_4bit))
    teacher = TranslationLM(loaded.model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    if vocab_size(teacher.model) != vocab_size(student):
        raise ModelError(f"kd.teacher: {path} has a {vocab_size(teacher.model)}-token LM head, the student "
                         f"{vocab_size(student)}; word-level KD needs the same vocabulary")
    return teacher, loaded.path


# ---------------------------------------------------------------------------------------------
# The stage


def _check_environment(cfg: FinetuneConfig) -> None:
    if problems := cfg.problems():
        raise ConfigError(problems)
    if cfg.mode == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError("mode: qlora needs bitsandbytes for the NF4 base; pip install 'stcompress[quant]', or use mode: lora")
    if cfg.model.load_in_4bit and cfg.mode != "qlora":
        raise ConfigError([f"model.load_in_4bit: mode {cfg.mode} trains a full-precision base; use mode: qlora for a 4-bit base"])
    if cfg.train.optimizer not in ("adamw", "adafactor") and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError([f"train.optimizer: {cfg.train.optimizer} needs bitsandbytes; pip install 'stcompress[quant]', "
                           "or use train.optimizer: adamw"])
    fsdp.check(cfg)


def checkpoint_dir(cfg: FinetuneConfig) -> Path:
    out = Path(cfg.output)
    return Path(cfg.train.checkpoint_dir) if cfg.train.checkpoint_dir else out.parent / f"{out.name}.checkpoints"


def _check_examples(data: TrainData, n: int) -> list[Example]:
    pool = data.dev_examples or [e.item.example for e in data.train]
    unique = list({id(ex): ex for ex in pool}.values())
    return unique[:n]


def _training_stats(state: TrainerState, report: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """What the manifest reports; final_train_loss is the token-mean CE of the last (partial) epoch."""
    secs = state.train_seconds
    devs = [r for r in state.history if r["kind"] == "dev"]
    sums = state.epoch_sums
    final = sums["ce"] / max(sums["targets"], 1.0) if sums.get("targets") else state.last_epoch_loss
    return {
        "steps": state.step, "epochs_completed": state.epoch, "stopped_early": state.stopped_early,
        "final_train_loss": final, "final_dev_loss": devs[-1]["dev_loss"] if devs else None,
        "final_dev_chrf": devs[-1].get("dev_chrf") if devs else None,
        "train_seconds": round(secs, 3), "tokens": state.tokens, "target_tokens": state.target_tokens,
        "tokens_per_s": state.tokens / secs if secs else None,
        "target_tokens_per_s": state.target_tokens / secs if secs else None,
        "peak_gpu_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "resumed_from_steps": state.resumed_from, **report,
    }


def cast_for_saving(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast as from_pretrained(dtype=...) would load: parameters only, and the dtype in every config.

    model.to() would also cast fp32 buffers such as RoPE's inv_freq (the reload check then fails,
    rightly); transformers 4.5x's dtype="auto" reads the sub-configs' dtype, so those change too.
    """
    with torch.no_grad():
        for param in model.parameters():
            param.data = param.data.to(dtype)
    for config in (model.config, getattr(model.config, "text_config", None), getattr(model.config, "audio_config", None)):
        if config is not None:
            config.dtype = dtype


def _save_dtype(cfg: FinetuneConfig, trained_on_gpu: bool) -> str | None:
    return cfg.train.save_dtype if cfg.train.save_dtype != "auto" else "bfloat16" if trained_on_gpu else None


def consolidate(cfg: FinetuneConfig, accelerator: Any, trainer: Trainer, job: Setup, ckpt_dir: Path) -> None:
    """FSDP: gather the trained weights (best ones when an earlier evaluation won) into a fresh
    unsharded copy of the model on rank 0, which the ordinary save and reload check then use."""
    state = fsdp.full_state_dict(accelerator, trainer.model)  # every process takes part
    trainer.release()
    if not accelerator.is_main_process:
        return
    best = trainer.state.best
    if best is not None and best["step"] != trainer.state.step:
        from safetensors.torch import load_file

        best_weights = load_file(str(ckpt_dir / "best" / "model.safetensors"))
        state.update({k.removeprefix("model."): v for k, v in best_weights.items()})
        log.info("FSDP: saving the best weights (step %d)", best["step"])
    name = _save_dtype(cfg, accelerator.device.type == "cuda") or load_student_dtype(cfg)
    fresh = load_model(dataclasses.replace(cfg.model, path=job.loaded.path, dtype=name, device=str(accelerator.device)))
    missing, unexpected = fresh.model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelError(f"FSDP consolidation: {len(missing)} weights missing, {len(unexpected)} unexpected "
                         f"(e.g. {sorted(missing or unexpected)[0]}); report this with the manifest")
    job.model = fresh.model


def load_student_dtype(cfg: FinetuneConfig) -> str:
    if cfg.model.dtype != "auto" or cfg.mode != "full":
        return cfg.model.dtype
    return "bfloat16" if cfg.train.master_weights == "bf16" else "float32"


def _save_weights(cfg: FinetuneConfig, model: torch.nn.Module, loaded: LoadedModel, data: TrainData, out: Path,
                  trained_on_gpu: bool) -> dict[str, Any]:
    if cfg.mode == "full":
        name = _save_dtype(cfg, trained_on_gpu)
        if name:
            cast_for_saving(model, getattr(torch, name))
        model.eval()
        save_model(model, loaded.processor, out / "model")
        return {"reload_check": reload_check(model, loaded.processor, out / "model",
                                             _check_examples(data, cfg.train.check_segments))}
    import peft

    adapter = out / "adapter"
    model.peft_config["default"].base_model_name_or_path = loaded.path
    model.save_pretrained(str(adapter))
    loaded.processor.save_pretrained(str(adapter))
    make_processor_files_portable(adapter, loaded.processor)
    saved = peft.load_peft_weights(str(adapter), device="cpu")
    memory = peft.get_peft_model_state_dict(model)
    same = saved.keys() == memory.keys() and all(torch.equal(saved[k], memory[k].detach().cpu()) for k in memory)
    if not same:
        raise ModelError(f"adapter check: the adapter saved in {adapter} differs from the trained one; "
                         "report this with the manifest")
    return {"adapter_check": {"tensors": len(saved), "identical": True}}


@dataclass
class Setup:
    """Everything a run trains with, built (and validated) before the first step."""

    loaded: LoadedModel
    model: torch.nn.Module  # the transformers model, or a peft model around it
    builder: PromptBuilder
    data: TrainData
    lineage: dict[str, Any]
    inputs: dict[str, Any]
    report: dict[str, Any]  # data counts for the manifest
    lora: dict[str, Any] | None
    teacher: TranslationLM | None
    timings: dict[str, float] = field(default_factory=dict)


def setup(cfg: FinetuneConfig, device: torch.device) -> Setup:
    """Data first (cheap errors early), then the model, then token ids (length errors, all at once)."""
    t0 = time.perf_counter()
    base_path, lineage = resolve_base(cfg.model.path)
    items, sources_report, data_inputs = load_training_items(cfg)
    dev_cfg = dev_data_config(cfg)
    dev_examples = load_examples(dev_cfg, on_error=cfg.on_error, require_references=True).examples if dev_cfg else []
    timings = {"load_data": time.perf_counter() - t0}
    t0 = time.perf_counter()
    loaded = load_student(cfg, base_path, device)
    builder = PromptBuilder(loaded.processor, cfg.prompt)
    extractor, tok = loaded.processor.feature_extractor, loaded.processor.tokenizer
    encode = dict(max_length=cfg.train.max_length, on_too_long=cfg.train.on_too_long, long_audio=cfg.train.long_audio)
    train_set, train_report = encode_items(items, builder, extractor, **encode)
    dev_set, _ = encode_items(reference_items(dev_examples), builder, extractor, what="dev data", **encode)
    if not train_set:
        raise DataError("datasets: every training item was skipped (audio over 30 s or over train.max_length); "
                        "pass --train.long-audio truncate or raise --train.max-length")
    model, lora_info = prepare_student(cfg, loaded)
    teacher, teacher_path = load_teacher(cfg, device, model)
    timings["load_model"] = time.perf_counter() - t0
    if lineage.get("upstream_prompt_config", dataclasses.asdict(cfg.prompt)) != dataclasses.asdict(cfg.prompt):
        log.warning("prompt: differs from the one %s was trained with; training and inference prompts should match", base_path)
    tower_cache = None
    if cfg.train.cache_audio:
        t1 = time.perf_counter()
        tower_cache = TowerCache()
        with evaluating(loaded.model):  # no dropout; 4-bit layers kept trainable (see evaluating)
            tower_cache.fill(loaded.model, extractor, [*train_set, *dev_set])
        timings["cache_audio"] = time.perf_counter() - t1
        log.info("train.cache_audio: tower output of %d clips cached (%.1f MB, %.1f s)", len(tower_cache),
                 tower_cache.nbytes / 1e6, timings["cache_audio"])
    collator = Collator(extractor, tok.pad_token_id if tok.pad_token_id is not None else 0, arch.audio_token_id(loaded.model),
                        tower_cache=tower_cache)
    inputs: dict[str, Any] = {"model": path_identity(loaded.path), "data": data_inputs}
    if teacher_path:
        inputs["teacher"] = path_identity(teacher_path)
    report = {"sources": sources_report, "train_items": len(train_set), "dev_items": len(dev_set),
              "dev_segments": len(dev_examples), "encoding": train_report.to_dict(cfg.train.long_audio),
              "cached_clips": len(tower_cache) if tower_cache is not None else 0}
    return Setup(loaded=loaded, model=model, builder=builder, lineage=lineage, inputs=inputs, report=report, lora=lora_info,
                 data=TrainData(train=train_set, dev=dev_set, dev_examples=dev_examples, collator=collator),
                 teacher=teacher, timings=timings)


def resume_inputs(cfg: FinetuneConfig, job: Setup) -> dict[str, Any]:
    """What a checkpoint is bound to besides the config: the content of every input."""
    dev_cfg = dev_data_config(cfg)
    return content_identity({**job.inputs, "dev": data_identity(dev_cfg) if dev_cfg else None})


def write_output(cfg: FinetuneConfig, job: Setup, state: TrainerState, stats: dict[str, Any], on_gpu: bool) -> None:
    langs = sorted({e.item.example.target_lang for e in job.data.train})
    t0 = time.perf_counter()
    with staged_output(cfg.output) as out:
        checks = _save_weights(cfg, job.model, job.loaded, job.data, out, on_gpu)
        write_jsonl(out / HISTORY, state.history)
        job.timings["save"] = time.perf_counter() - t0
        lineage = {k: v for k, v in job.lineage.items() if k != "upstream_prompt_config"}
        manifest = build_manifest(
            "finetune", to_dict(cfg), job.inputs, job.timings,
            mode=cfg.mode, base_model=job.loaded.path, **lineage,
            output={"model": "model"} if cfg.mode == "full" else {"adapter": "adapter"},
            prompt=job.builder.render(langs[0]), prompt_config=dataclasses.asdict(cfg.prompt),
            target_lang=langs[0], target_langs=langs, data=job.report, training=stats, best_checkpoint=state.best,
            lora=job.lora, decoder_layers=arch.num_decoder_layers(job.loaded.model), **checks,
        )
        atomic_write_json(out / MANIFEST, manifest)


@claims_output()
def run(cfg: FinetuneConfig, *, progress: bool = True,
        on_step: Callable[[TrainerState], None] | None = None) -> Path:
    """Fine-tune and write the output directory; `on_step(state)` runs after every optimizer step."""
    from accelerate.utils import set_seed

    _check_environment(cfg)
    if cfg.dry_run:
        from stcompress.training import memory

        print(memory.format_estimate(memory.estimate_for(cfg)))
        return Path(cfg.output)
    ckpt_dir = checkpoint_dir(cfg)
    for stale in ckpt_dir.glob(".*.partial"):  # a save a kill interrupted (we hold the output's lock)
        shutil.rmtree(stale, ignore_errors=True)
    saved = read_state(ckpt_dir) if cfg.train.resume == "auto" else None
    if saved is not None:  # before loading anything: a mismatched checkpoint is refused at once
        check_resumable(saved, resume_config(to_dict(cfg)), ckpt_dir)
    accelerator = make_accelerator(cfg)
    set_seed(cfg.train.seed)
    job = setup(cfg, accelerator.device)
    inputs = resume_inputs(cfg, job)
    if saved is not None:
        check_inputs(saved, inputs, ckpt_dir)
    params = trainable_report(job.model)
    log.info("%s fine-tuning: %d training items, %d dev items, %s of %s weights train (%.2f%%)", cfg.mode,
             len(job.data.train), len(job.data.dev), f"{params['trainable_parameters']:,}",
             f"{params['total_parameters']:,}", params["trainable_percent"])
    if fsdp.sharded(accelerator):
        fsdp.set_units(accelerator, job.loaded.model)
    t0 = time.perf_counter()
    trainer = Trainer(cfg, accelerator, TranslationLM(job.model, loss_chunk=cfg.train.loss_chunk), job.data, processor=job.loaded.processor,
                      ckpt_dir=ckpt_dir, config=to_dict(cfg), teacher=job.teacher, progress=progress, on_step=on_step)
    trainer.state.inputs = inputs
    trainer.restore()
    state = trainer.fit()
    job.timings["train"] = time.perf_counter() - t0
    if fsdp.sharded(accelerator):
        consolidate(cfg, accelerator, trainer, job, ckpt_dir)
    trainer.release()
    job.teacher = None
    stats = _training_stats(state, params, accelerator.device)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_output(cfg, job, state, stats, accelerator.device.type == "cuda")
        if not cfg.train.keep_checkpoints:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
    accelerator.wait_for_everyone()
    loss = stats["final_train_loss"]
    log.info("%s fine-tuning done: %d steps, final train loss %s -> %s", cfg.mode, state.step,
             f"{loss:.2f}" if isinstance(loss, float) else loss, cfg.output)
    return Path(cfg.output)
