"""Typed, frozen stage configs; YAML files plus dotted command-line overrides.

Precedence: dataclass defaults < YAML file < command-line overrides. Every problem in a config
(unknown key, wrong type, bad choice) is collected and reported at once, each naming the key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from stcompress.errors import ConfigError


@dataclass(frozen=True)
class ModelConfig:
    # A hub id (Qwen/Qwen2-Audio-7B-Instruct), a local directory (ours included), or
    # "builtin:tiny-random" (a tiny random-weight model for tests) or "builtin:demo-base" (the demo's
    # untrained model: Whisper tiny.en encoder + small decoder), both built offline.
    path: str = "builtin:tiny-random"
    # auto: bf16 on GPU, fp32 on CPU; checkpoint: the dtype the weights were saved in
    dtype: Literal["auto", "checkpoint", "bfloat16", "float16", "float32"] = "auto"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    device_map: str | None = None  # e.g. "auto" to shard one model over several GPUs
    load_in_4bit: bool = False  # bitsandbytes NF4 (double quantization, bf16 compute)
    attn_implementation: str | None = None  # sdpa | eager | flash_attention_2; None: transformers' default


@dataclass(frozen=True)
class DataConfig:
    # "builtin" (the small example shipped with stcompress), a local manifest (.jsonl / .tsv), or a
    # Hugging Face dataset name such as ymoslem/ACL-6060.
    dataset: str = "builtin"
    format: Literal["auto", "builtin", "jsonl", "tsv", "hf"] = "auto"
    hf_config: str | None = None
    split: str = "dev+eval"  # HF split expression (the paper: ACL 60/60 dev+eval, 884 segments)
    audio_column: str = "audio"
    id_column: str | None = None  # None: the "id" column when there is one, else row numbers
    source_column: str | None = "text_en"  # gold transcript; optional
    reference_column: str | None = None  # None: "text_<target_lang>"
    target_lang: str = "de"
    # Which part to use: the paper's split is datasets' train_test_split(test_size, seed);
    # "dev" is carved out of the train part (dev_size rows) so tuning need not touch the test set.
    subset: Literal["all", "train", "dev", "test"] = "all"
    test_size: int = 100
    dev_size: int = 0
    split_seed: int = 0
    limit: int | None = None  # keep the first N examples after splitting
    max_audio_seconds: float = 30.0  # the feature extractor truncates longer clips; we count and warn


@dataclass(frozen=True)
class PromptConfig:
    system: str = "You are a professional translator."
    instruction: str = "Translate the English speech into {language}:"


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 256  # never max_length: that would count the ~200-790 prompt tokens
    batch_size: int = 16  # halved automatically on out-of-memory
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    sort_by_length: bool = True
    seed: int = 0
    # Greedy decoding over a preallocated KV cache, one CUDA graph per step on GPU (same tokens as
    # transformers' decoding, several times faster); false: transformers' own decode step.
    static_cache: bool = True


@dataclass(frozen=True)
class CometConfig:
    model: str | None = None  # e.g. Unbabel/wmt22-comet-da (wmt20-comet-da for paper parity); None: off
    batch_size: int = 16


@dataclass(frozen=True)
class TranslateConfig:
    output: str = "outputs/translate"
    on_error: Literal["fail", "skip"] = "fail"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)


@dataclass(frozen=True)
class EvaluateConfig:
    output: str = "outputs/evaluate"
    # An existing hypotheses.jsonl (or the translate directory holding it). When None, the model
    # translates `data` first, exactly as `stcompress translate` would.
    hypotheses: str | None = None
    metrics: tuple[str, ...] = ("bleu", "chrf", "chrf++")
    on_error: Literal["fail", "skip"] = "fail"
    comet: CometConfig = field(default_factory=CometConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)


# ---------------------------------------------------------------------------------------------
# Loading


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"true", "yes", "1", "on"}:
        return True
    if text in {"false", "no", "0", "off"}:
        return False
    raise ValueError("expected true or false")


def _coerce(tp: Any, value: Any) -> Any:
    """Turn a YAML value or command-line string into `tp`; ValueError says what was expected."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.strip().lower() in {"none", "null", "~"}):
            if type(None) in get_args(tp):
                return None
        errors = []
        for arg in args:
            try:
                return _coerce(arg, value)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError("; ".join(errors))
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(map(str, choices))}")
        return value
    if origin in (tuple, list):
        inner = get_args(tp)[0] if get_args(tp) else str
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ValueError("expected a list")
        return tuple(_coerce(inner, v) for v in value)
    if tp is bool:
        return _parse_bool(value)
    if tp is int:
        if isinstance(value, bool):
            raise ValueError("expected an integer")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ValueError("expected an integer") from None
    if tp is float:
        if isinstance(value, bool):
            raise ValueError("expected a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError("expected a number") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ValueError("expected a string")
        return str(value)
    if tp is Any:
        return value
    raise ValueError(f"unsupported type {tp}")


def _field_default(cls: type, name: str) -> Any:
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]


def _build(cls: type, data: dict[str, Any], prefix: str, problems: list[str], base: Any = None) -> Any:
    """`cls` from `data`; fields not in `data` come from `base` (the parent's default for this
    section, e.g. prune's model dtype "checkpoint") or else from `cls`'s own defaults."""
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        where = f"{prefix}{key}"
        if name not in hints:
            known = ", ".join(f.name for f in dataclasses.fields(cls))
            problems.append(f"{where}: unknown key; known keys here: {known}")
            continue
        tp = hints[name]
        if _is_dataclass_type(tp):
            if not isinstance(value, dict):
                problems.append(f"{where}: expected a mapping of {tp.__name__} keys")
                continue
            kwargs[name] = _build(tp, value, f"{where}.", problems, base=_field_default(cls, name))
            continue
        inner = get_args(tp)[0] if get_origin(tp) in (tuple, list) and get_args(tp) else None
        if _is_dataclass_type(inner):  # a list of sections, e.g. several datasets to mix
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, dict) for v in value):
                problems.append(f"{where}: expected a list of {inner.__name__} mappings")
                continue
            kwargs[name] = tuple(_build(inner, v, f"{where}[{i}].", problems) for i, v in enumerate(value))
            continue
        try:
            kwargs[name] = _coerce(tp, value)
        except ValueError as exc:
            problems.append(f"{where}: {exc} (got {value!r})")
    try:
        return dataclasses.replace(base, **kwargs) if isinstance(base, cls) else cls(**kwargs)
    except TypeError as exc:  # only reachable through a programming error in the dataclass
        problems.append(f"{prefix or cls.__name__}: {exc}")
        return None


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[parts[-1]] = value


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"{path}: config file not found; check the path"])
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: not valid YAML ({exc.__class__.__name__}); fix the syntax"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: the top level must be a mapping of keys"])
    return data


def load_config(cls: type, yaml_data: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None) -> Any:
    """Build `cls` from YAML data and dotted overrides ({"generation.batch_size": "8"})."""
    tree: dict[str, Any] = {}
    for key, value in (yaml_data or {}).items():
        tree[key] = value
    for dotted, value in (overrides or {}).items():
        _set_dotted(tree, dotted.replace("-", "_"), value)
    problems: list[str] = []
    cfg = _build(cls, tree, "", problems)
    problems.extend(validate(cfg) if cfg is not None else [])
    if problems:
        raise ConfigError(problems)
    return cfg


def validate(cfg: Any) -> list[str]:
    """Semantic checks that types alone cannot express."""
    problems: list[str] = []
    gen = getattr(cfg, "generation", None)
    if gen is not None:
        if gen.max_new_tokens < 1:
            problems.append("generation.max_new_tokens: must be at least 1")
        if gen.batch_size < 1:
            problems.append("generation.batch_size: must be at least 1")
        if gen.num_beams < 1:
            problems.append("generation.num_beams: must be at least 1")
    data = getattr(cfg, "data", None)
    if data is not None:
        from stcompress.languages import known_languages

        if data.target_lang not in known_languages():
            problems.append(
                f"data.target_lang: unknown language code {data.target_lang!r}; "
                f"use one of {', '.join(known_languages())}"
            )
        if data.test_size < 0 or data.dev_size < 0:
            problems.append("data.test_size / data.dev_size: must not be negative")
        if data.limit is not None and data.limit < 1:
            problems.append("data.limit: must be at least 1 (or null for all examples)")
    prompt = getattr(cfg, "prompt", None)
    if prompt is not None and "{language}" not in prompt.instruction:
        problems.append("prompt.instruction: must contain {language}, e.g. 'Translate the English speech into {language}:'")
    own = getattr(cfg, "problems", None)
    if callable(own):  # a stage config's own cross-field checks
        problems.extend(own())
    return problems


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain, YAML/JSON-ready dict of a config (tuples become lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(cfg))


def flat_fields(cls: type, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted name, type, default) of every leaf field, for building command-line options."""
    out: list[tuple[str, Any, Any]] = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if _is_dataclass_type(tp):
            out.extend(flat_fields(tp, f"{prefix}{f.name}."))
        elif get_origin(tp) in (tuple, list) and get_args(tp) and _is_dataclass_type(get_args(tp)[0]):
            continue  # lists of sections are set in the YAML file only
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            out.append((f"{prefix}{f.name}", tp, default))
    return out


@dataclass(frozen=True)
class ImportanceConfig:
    """The paper's iterative greedy layer-importance search (PAPER.md, step 2)."""

    output: str = "outputs/importance"
    component: Literal["decoder", "encoder"] = "decoder"  # encoder: the paper's audio-encoder ablation
    metric: str | None = None  # selection metric; None: chrf++ for German, chrf for Chinese (the paper)
    log_metrics: tuple[str, ...] = ("bleu", "chrf", "chrf++")
    protect: tuple[int, ...] | None = None  # never removed; None: the first and the last layer
    rounds: int | None = 8  # layers to remove (one per round); None: until another stop applies
    target_layers: int | None = None  # stop when this many layers remain
    min_fraction: float | None = None  # stop when the best candidate scores below this x the unpruned score
    # Approximations (off by default, labelled as such in every output they touch):
    halving: bool = False  # successive halving over dev segments within a round
    halving_eta: int = 3
    halving_min_segments: int = 10
    prefilter: str | None = None  # proxy that pre-selects candidates: block_influence | tf_loss
    prefilter_keep: int = 8  # candidates per round kept for generation by the prefilter
    proxies: tuple[str, ...] = ()  # proxies logged for every candidate, with their rank correlation
    wait_timeout: float = 86400.0  # seconds a process waits for the other GPUs' candidates
    comet: CometConfig = field(default_factory=CometConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)


@dataclass(frozen=True)
class PruneConfig:
    """Physically remove layers and save a model that loads with plain from_pretrained."""

    output: str = "outputs/prune"
    layers: tuple[int, ...] = ()  # decoder layers to remove (0-based, original numbering)
    importance: str | None = None  # an importance output: remove the first `num_layers` of its order
    num_layers: int | None = None  # None: the whole removal order
    encoder_layers: tuple[int, ...] = ()  # audio-encoder layers to remove
    check_segments: int = 4  # reload check: segments of `data` decoded before and after saving
    check_max_new_tokens: int = 16
    model: ModelConfig = field(default_factory=lambda: ModelConfig(dtype="checkpoint"))
    data: DataConfig = field(default_factory=DataConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)


@dataclass(frozen=True)
class DistillConfig:
    """Sequence-level KD data (PAPER.md step 3): references plus the teacher's translations."""

    output: str = "outputs/distill"
    on_error: Literal["fail", "skip"] = "fail"
    teacher_only: bool = False  # leave the references out of examples.jsonl
    upsample: int = 1  # rows per kept teacher output (the paper's Model B trains on 10x KD data)
    # Quality filter (distil-whisper filters pseudo-labels by WER): drop teacher outputs whose
    # sentence score against the reference is below min_score; None: no filter.
    filter_metric: str = "chrf"
    min_score: float | None = None
    model: ModelConfig = field(default_factory=ModelConfig)  # the teacher
    data: DataConfig = field(default_factory=lambda: DataConfig(subset="train"))
    prompt: PromptConfig = field(default_factory=PromptConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)

    def problems(self) -> list[str]:
        from stcompress.metrics.text import METRICS

        out = []
        if self.upsample < 1:
            out.append("upsample: must be at least 1 (1 = each teacher output once)")
        if self.filter_metric not in METRICS:
            out.append(f"filter_metric: unknown sentence metric {self.filter_metric!r}; use one of {', '.join(METRICS)}")
        if self.min_score is not None and not 0 <= self.min_score <= 100:
            out.append(f"min_score: {self.min_score} is outside 0..100 (sacrebleu scale); e.g. 30, or null for no filter")
        return out


@dataclass(frozen=True)
class ExportConfig:
    """Merge LoRA in full precision, save, optionally quantize to NF4, prove the result reloads."""

    output: str = "outputs/export"
    input: str = ""  # a finetune output (manifest.json + model/ or adapter/), or any model dir / hub id
    base_model: str | None = None  # LoRA / QLoRA: overrides the finetune manifest's base_model
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"  # merge and save in this (never in 4-bit)
    device: str = "auto"
    quantize: Literal["none", "nf4", "int8", "hqq"] = "none"  # after the merge: nf4 / int8 bitsandbytes, hqq 1-8 bit (4.57)
    bits: str = ""  # per component, e.g. decoder_layers=3,lm_head=8,audio_tower=4 (16 = kept in dtype; hqq default 4)
    group_size: int = 64  # hqq: weights per scale/zero group
    # nf4: components left in `dtype`. embed_tokens always is (transformers' bitsandbytes path has no
    # 4-bit embedding); lm_head is kept by default, as transformers does.
    keep_unquantized: tuple[str, ...] = ("lm_head",)
    double_quant: bool = True
    scores: str | None = None  # an evaluate output (or its scores.json), shown in the model card
    check_segments: int = 4  # reload check: segments of `data` decoded before and after saving
    check_max_new_tokens: int = 16
    check_min_agreement: float = 1.0  # nf4 reload check: greedy token agreement required (1.0 = exact)
    data: DataConfig = field(default_factory=DataConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)

    def problems(self) -> list[str]:
        from stcompress.model.arch import QUANTIZABLE_COMPONENTS

        out = []
        if not self.input:
            out.append("input: required; give a finetune output directory or a model directory (--input DIR)")
        bad = [c for c in self.keep_unquantized if c not in QUANTIZABLE_COMPONENTS]
        if bad:
            hint = " (embed_tokens is never quantized)" if "embed_tokens" in bad else ""
            out.append(f"keep_unquantized: unknown component {bad[0]!r}{hint}; use any of {', '.join(QUANTIZABLE_COMPONENTS)}")
        from stcompress.quantize import bits_problems

        out += bits_problems(self.quantize, self.bits, tuple(self.keep_unquantized), self.group_size)
        if self.check_segments < 1:
            out.append("check_segments: must be at least 1 (every export is reload-checked)")
        if not 0 < self.check_min_agreement <= 1:
            out.append("check_min_agreement: must be in (0, 1]; 1.0 requires identical greedy output")
        return out


@dataclass(frozen=True)
class DatasetMix:
    """One training source of a mix (the paper's Model B: ACL 60/60 + 10x KD data + 100k CoVoST 2)."""

    data: DataConfig = field(default_factory=DataConfig)
    # A `stcompress distill` output: its examples.jsonl targets, audio from the data section recorded
    # in its manifest (this entry's `data` is then ignored).
    distilled: str | None = None
    repeat: float = 1.0  # 10: every item ten times; 0.5: a seeded random half
    name: str | None = None  # label in the manifest; default: the dataset name or distill directory


@dataclass(frozen=True)
class LoraOptions:
    """LoRA / QLoRA adapters; defaults are the paper's (r 64, alpha 128, rsLoRA, dropout 0, all linear)."""

    r: int = 64
    alpha: float = 128.0
    dropout: float = 0.0
    rslora: bool = True  # scale alpha / sqrt(r) (rank-stabilised LoRA)
    # "all-linear" or module names (q_proj, fc1, ...); the LM head is never adapted.
    targets: tuple[str, ...] = ("all-linear",)
    audio_tower: bool = True  # adapt the audio encoder's linears too (the paper's 2.41% trainable)
    # qlora: peft's prepare_model_for_kbit_training (upcasts non-quantized weights to fp32, in memory only)
    prepare_kbit: bool = True
    # qlora: components loaded in full precision instead of NF4 (lm_head: transformers' default;
    # add audio_tower for a frozen encoder whose output train.cache_audio keeps anyway)
    keep_unquantized: tuple[str, ...] = ("lm_head",)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation; defaults are the paper's teacher (3 epochs, batch 4, lr 1e-5, cosine, no warmup)."""

    epochs: int = 3
    max_steps: int | None = None  # optimizer steps; stops earlier than `epochs` when reached
    batch_size: int = 4  # per device
    grad_accum: int = 1
    lr: float = 1e-5
    weight_decay: float = 0.001  # on matrices only (biases and norms are not decayed)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0  # None: no clipping
    max_length: int = 1024  # prompt (audio tokens included) + target + end-of-turn token
    on_too_long: Literal["fail", "skip"] = "fail"
    # Clips longer than the feature extractor's 30 s: "skip" them (their target describes audio the
    # model cannot hear), or "truncate" (train on the first 30 s, as inference would).
    long_audio: Literal["skip", "truncate"] = "skip"
    freeze_audio_tower: bool = False  # full: no updates to the audio encoder; lora: no adapters there
    # With freeze_audio_tower: run the audio tower once per clip, before training, and keep its output
    # in memory (~1.9 MB per 30 s clip for the 7B in bf16) instead of recomputing it every epoch.
    cache_audio: bool = False
    gradient_checkpointing: bool = False
    mixed_precision: Literal["auto", "bf16", "fp16", "no"] = "auto"  # auto: bf16 on GPU, none on CPU
    seed: int = 0
    num_workers: int = 0  # DataLoader workers computing audio features
    log_every: int = 10  # optimizer steps per history.jsonl row
    save_every: int = 0  # optimizer steps between checkpoints; 0: at each epoch end only
    checkpoint_dir: str | None = None  # None: <output>.checkpoints beside the output
    resume: Literal["auto", "never"] = "auto"  # auto: continue from the last checkpoint when there is one
    keep_checkpoints: bool = False  # keep the checkpoint directory after a successful run
    save_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"  # full: model/ dtype; auto: bf16 on GPU
    check_segments: int = 2  # full: segments decoded before and after saving (reload check)


@dataclass(frozen=True)
class DevConfig:
    """The dev split evaluated during training; it picks the best checkpoint and stops early."""

    # auto: data's dev part when data.subset is train and data.dev_size > 0 (disjoint from train and
    # test); none: no dev evaluation; otherwise a dataset read with data's columns and language.
    dataset: str = "auto"
    limit: int | None = None
    every: int = 0  # optimizer steps between evaluations; 0: at each epoch end
    metric: Literal["loss", "chrf"] = "loss"  # chrf: needs chrf_segments > 0
    patience: int = 0  # stop after this many evaluations without improvement; 0: never stop early
    chrf_segments: int = 0  # also translate this many dev segments (chrF++; chrF for zh/ja/ko)
    batch_size: int = 8
    max_new_tokens: int = 128


@dataclass(frozen=True)
class KDConfig:
    """Word-level KD (beyond the paper): loss = (1 - ratio) * CE + ratio * T^2 * KL(teacher || student)."""

    teacher: str | None = None  # a model directory (or stcompress output) sharing the student's tokenizer
    ratio: float = 0.0  # 0: off
    temperature: float = 1.0
    teacher_4bit: bool = False  # load the teacher in NF4 to save memory


@dataclass(frozen=True)
class FinetuneConfig:
    """Full fine-tuning, LoRA or QLoRA of a Qwen2-Audio model on speech-translation pairs."""

    output: str = "outputs/finetune"
    mode: Literal["full", "lora", "qlora"] = "full"
    on_error: Literal["fail", "skip"] = "fail"
    model: ModelConfig = field(default_factory=ModelConfig)  # dtype auto: fp32 weights for full, bf16 (GPU) for lora
    data: DataConfig = field(default_factory=DataConfig)  # the training data when `datasets` is empty
    datasets: tuple[DatasetMix, ...] = ()  # a mix (YAML only); replaces `data` as training data
    prompt: PromptConfig = field(default_factory=PromptConfig)
    lora: LoraOptions = field(default_factory=LoraOptions)
    train: TrainConfig = field(default_factory=TrainConfig)
    dev: DevConfig = field(default_factory=DevConfig)
    kd: KDConfig = field(default_factory=KDConfig)

    def problems(self) -> list[str]:
        from stcompress.languages import known_languages

        out = []
        t, kd, dev = self.train, self.kd, self.dev
        for name, value in (("epochs", t.epochs), ("batch_size", t.batch_size), ("grad_accum", t.grad_accum),
                            ("max_length", t.max_length), ("log_every", t.log_every)):
            if value < 1:
                out.append(f"train.{name}: must be at least 1 (got {value})")
        if t.max_steps is not None and t.max_steps < 1:
            out.append("train.max_steps: must be at least 1 (or null to train for train.epochs)")
        if t.lr <= 0 or t.weight_decay < 0 or t.warmup_steps < 0 or t.save_every < 0:
            out.append("train.lr / weight_decay / warmup_steps / save_every: lr must be positive, the others not negative")
        if self.mode != "full" and (self.lora.r < 1 or self.lora.alpha <= 0 or not 0 <= self.lora.dropout < 1):
            out.append("lora: r must be at least 1, alpha positive and dropout in [0, 1)")
        from stcompress.model.arch import QUANTIZABLE_COMPONENTS

        for name in self.lora.keep_unquantized:
            if name not in QUANTIZABLE_COMPONENTS:
                out.append(f"lora.keep_unquantized: {name!r} is not a quantizable component; use any of "
                           f"{', '.join(QUANTIZABLE_COMPONENTS)}")
        if not 0 <= kd.ratio <= 1:
            out.append(f"kd.ratio: {kd.ratio} is outside [0, 1]; loss = (1 - ratio) * CE + ratio * KD")
        if kd.temperature <= 0:
            out.append("kd.temperature: must be positive (1.0 = plain softmax)")
        if kd.ratio > 0 and not kd.teacher:
            out.append(f"kd.teacher: word-level KD (kd.ratio {kd.ratio}) needs a teacher; set kd.teacher to a model "
                       "directory, or kd.ratio: 0")
        if t.cache_audio and not t.freeze_audio_tower:
            out.append("train.cache_audio: needs train.freeze_audio_tower: true (a tower that trains changes its output)")
        if t.cache_audio and kd.ratio > 0:
            out.append("train.cache_audio: not with word-level KD (kd.ratio > 0): the teacher needs its own audio features")
        if dev.metric == "chrf" and dev.chrf_segments < 1:
            out.append("dev.metric: chrf needs dev.chrf_segments > 0 (segments translated at each evaluation)")
        if dev.every < 0 or dev.patience < 0 or dev.batch_size < 1:
            out.append("dev.every / dev.patience: must not be negative; dev.batch_size: at least 1")
        for i, mix in enumerate(self.datasets):
            if mix.repeat < 0:
                out.append(f"datasets[{i}].repeat: {mix.repeat} is negative; use 0 (leave out) or more")
            if mix.distilled is None and mix.data.target_lang not in known_languages():
                out.append(f"datasets[{i}].data.target_lang: unknown language code {mix.data.target_lang!r}")
        return out


@dataclass(frozen=True)
class RunConfig:
    """`stcompress run RECIPE.yaml`: the stages a recipe lists, each into <run_dir>/<name>."""

    recipe: str = ""  # the recipe YAML (also accepted as the positional argument)
    dry_run: bool = False  # validate and print the plan (stage, output, inputs, skip or run), then exit
    from_stage: str | None = None  # rerun this stage and every later one, even if unchanged (--from)
    only: str | None = None  # run just this stage (its upstream outputs must be complete)

    def problems(self) -> list[str]:
        out = []
        if not self.recipe:
            out.append("recipe: required; give a recipe file (stcompress run recipes/de-model-b.yaml)")
        if self.from_stage and self.only:
            out.append("from_stage / only: give one of --from and --only, not both")
        return out


@dataclass(frozen=True)
class DemoConfig:
    """`stcompress demo`: the whole pipeline, offline on CPU, on the built-in speech-translation task."""

    run_dir: str = "runs/demo"
    target_lang: Literal["de", "zh"] = "de"
    fresh: bool = False  # delete run_dir first (otherwise finished stages are skipped, as in `run`)


@dataclass(frozen=True)
class ReportConfig:
    """`stcompress report RUN_DIR`: render what the stages of a run wrote (never recomputes)."""

    run_dir: str = ""  # a `stcompress run` directory (or any directory holding stage outputs)
    output: str = ""  # default: <run_dir>/report
    title: str | None = None  # default: the run directory's name
    # The evaluate output every "% of teacher" is relative to (its directory name); default: the
    # one whose name contains "teacher", else the first evaluate output of the run.
    teacher: str | None = None

    def problems(self) -> list[str]:
        return [] if self.run_dir else ["run_dir: required; give the run directory (stcompress report runs/demo)"]
