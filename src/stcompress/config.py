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
    # "builtin:tiny-random", a tiny random-weight model built offline for demos and tests.
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


def _build(cls: type, data: dict[str, Any], prefix: str, problems: list[str]) -> Any:
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
            kwargs[name] = _build(tp, value, f"{where}.", problems)
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
        return cls(**kwargs)
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
