"""Typed, frozen stage configs; YAML files plus dotted command-line overrides.

Precedence: dataclass defaults < YAML file < command-line overrides. Every problem in a config
(unknown key, wrong type, bad choice) is collected and reported at once, each naming the key.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import io
import tokenize
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Union, get_args, get_origin

import yaml

from stcompress.errors import ConfigError

# The `builtin:` models (model/tiny.py builds them; a test keeps the two lists equal).
BUILTIN_MODELS = ("builtin:tiny-random", "builtin:demo-base")
MODEL_REQUIRED = (f"model.path: required; give --model.path DIR|HUB_ID (a model directory or a hub id such as "
                  f"Qwen/Qwen2-Audio-7B-Instruct; built-in models: {', '.join(BUILTIN_MODELS)})")


@dataclass(frozen=True)
class ModelConfig:
    # Required: a hub id (Qwen/Qwen2-Audio-7B-Instruct), a local model directory (stcompress outputs
    # included), or a built-in model built offline: builtin:tiny-random (tiny, random weights, for
    # tests) or builtin:demo-base (the demo's untrained Whisper tiny.en + small decoder model).
    path: str = ""
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
    format: Literal["auto", "builtin", "jsonl", "tsv", "hf"] = "auto"  # auto: by name (.jsonl/.json, .tsv, else hf)
    hf_config: str | None = None  # the HF dataset's configuration name, when it has several
    split: str = "dev+eval"  # HF split expression (the paper: ACL 60/60 dev+eval, 884 segments)
    audio_column: str = "audio"  # column holding the audio (a file path or an HF Audio cell)
    id_column: str | None = None  # None: the "id" column when there is one, else row numbers
    source_column: str | None = "text_en"  # gold transcript; optional
    reference_column: str | None = None  # None: "text_<target_lang>"
    target_lang: str = "de"  # language code of the translations (de, zh, ja, ...)
    # Which part to use: the paper's split is datasets' train_test_split(test_size, seed);
    # "dev" is carved out of the train part (dev_size rows) so tuning need not touch the test set.
    subset: Literal["all", "train", "dev", "test"] = "all"
    test_size: int = 100  # rows in the test part (the paper: 100)
    dev_size: int = 0  # rows of the train part set aside as dev
    split_seed: int = 0  # seed of the train/test split
    limit: int | None = None  # keep the first N examples after splitting
    max_audio_seconds: float = 30.0  # the feature extractor truncates longer clips; we count and warn


@dataclass(frozen=True)
class PromptConfig:
    system: str = "You are a professional translator."  # the system message of the chat prompt
    # the user text after the audio; {language} becomes the target language's name
    instruction: str = "Translate the English speech into {language}:"


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 256  # never max_length: that would count the ~200-790 prompt tokens
    batch_size: int = 16  # halved automatically on out-of-memory
    num_beams: int = 1  # beam search width; 1: greedy
    do_sample: bool = False  # sample instead of greedy / beam decoding
    temperature: float = 1.0  # sampling temperature (with do_sample)
    top_p: float = 1.0  # nucleus sampling mass (with do_sample)
    repetition_penalty: float = 1.0  # > 1 discourages repeated tokens
    sort_by_length: bool = True  # batch clips of similar length (less padding; output order is kept)
    seed: int = 0  # random seed for sampling
    # Greedy decoding over a preallocated KV cache, one CUDA graph per step on GPU (same tokens as
    # transformers' decoding, several times faster); false: transformers' own decode step.
    static_cache: bool = True


@dataclass(frozen=True)
class CometConfig:
    model: str | None = None  # e.g. Unbabel/wmt22-comet-da (wmt20-comet-da for paper parity); None: off
    batch_size: int = 16  # segments per COMET batch


@dataclass(frozen=True)
class TranslateConfig:
    output: str = "outputs/translate"  # the output directory (written whole at the end; an earlier one is replaced)
    on_error: Literal["fail", "skip"] = "fail"  # a bad item (unreadable audio, no reference): fail, or skip and list it
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)


@dataclass(frozen=True)
class EvaluateConfig:
    output: str = "outputs/evaluate"  # the output directory (written whole at the end; an earlier one is replaced)
    # An existing hypotheses.jsonl (or the translate directory holding it). When None, the model
    # translates `data` first, exactly as `stcompress translate` would.
    hypotheses: str | None = None
    metrics: tuple[str, ...] = ("bleu", "chrf", "chrf++")  # any of bleu, chrf, chrf++, comet
    on_error: Literal["fail", "skip"] = "fail"  # a bad item (unreadable audio, no reference): fail, or skip and list it
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


def _parse_int(value: Any) -> int:
    """One rule for YAML and the command line: whole numbers only (2, "2", 2.0); 2.5 is refused,
    never truncated."""
    if isinstance(value, bool):
        raise ValueError("expected an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        return int(value)
    try:
        number = float(value) if isinstance(value, float) else float(str(value).strip())
    except (TypeError, ValueError):
        raise ValueError("expected an integer") from None
    if not number.is_integer():
        raise ValueError("expected a whole number, not a fraction")
    return int(number)


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
        return _parse_int(value)
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


def load_config(cls: type, yaml_data: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None,
                *, check: bool = True) -> Any:
    """Build `cls` from YAML data and dotted overrides ({"generation.batch_size": "8"}).

    check=False skips the semantic checks (required fields, ranges): `--print-config` shows the
    skeleton of a config that is not complete yet; type errors still raise."""
    tree: dict[str, Any] = {}
    for key, value in (yaml_data or {}).items():
        tree[key] = value
    for dotted, value in (overrides or {}).items():
        _set_dotted(tree, dotted.replace("-", "_"), value)
    problems: list[str] = []
    cfg = _build(cls, tree, "", problems)
    if check and cfg is not None:
        problems.extend(validate(cfg))
    if problems:
        raise ConfigError(problems)
    return cfg


def validate(cfg: Any) -> list[str]:
    """Semantic checks that types alone cannot express."""
    problems: list[str] = []
    if model_required(cfg) and not cfg.model.path:
        problems.append(MODEL_REQUIRED)
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


def model_required(cfg: Any) -> bool:
    """Whether `cfg` loads `model.path` (evaluate of a hypotheses file and prune of an importance
    output, whose manifest names the model, do not need it)."""
    if getattr(cfg, "model", None) is None or not isinstance(cfg.model, ModelConfig):
        return False
    return not (getattr(cfg, "hypotheses", None) or getattr(cfg, "importance", None))


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain, YAML/JSON-ready dict of a config (tuples become lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(cfg))


def flat_fields(cls: type, prefix: str = "", defaults: Any = None) -> list[tuple[str, Any, Any]]:
    """(dotted name, type, default) of every leaf field, for building command-line options.

    Defaults are the real ones: a section's default comes from its parent (prune's model.dtype is
    "checkpoint", distill's data.subset "train"), not from the section class alone."""
    out: list[tuple[str, Any, Any]] = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        default = getattr(defaults, f.name) if defaults is not None else _field_default(cls, f.name)
        if _is_dataclass_type(tp):
            out.extend(flat_fields(tp, f"{prefix}{f.name}.", default))
        elif get_origin(tp) in (tuple, list) and get_args(tp) and _is_dataclass_type(get_args(tp)[0]):
            continue  # lists of sections are set in the YAML file only
        else:
            out.append((f"{prefix}{f.name}", tp, default))
    return out


@functools.cache
def _comments() -> dict[tuple[str, str], str]:
    """(class name, field name) -> the comment on that field's line, or the comment block above it.

    The comments in this file are the one description of each option: `--help` shows them."""
    source = Path(__file__).read_text(encoding="utf-8")
    lines = source.splitlines()
    trailing = {tok.start[0]: tok.string.lstrip("# ").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    out: dict[tuple[str, str], str] = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        for item in node.body:
            if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
                continue
            above, n = [], item.lineno - 1
            while n >= 1 and lines[n - 1].strip().startswith("#"):
                above.insert(0, lines[n - 1].strip().lstrip("# ").strip())
                n -= 1
            own = trailing.get(item.lineno) if not lines[item.lineno - 1].strip().startswith("#") else None
            text = " ".join(part for part in (" ".join(above), own) if part)
            if text:
                out[(node.name, item.target.id)] = text
    return out


def field_help(cls: type, dotted: str) -> str:
    """The one-line meaning of the dotted field `dotted` of `cls` (from the comments above)."""
    *sections, name = dotted.split(".")
    for section in sections:
        cls = _hints(cls)[section]
    return _comments().get((cls.__name__, name), "")


def config_yaml(cfg: Any) -> str:
    """`cfg` as YAML; fields still required print as `null  # required`, so an incomplete config
    (export without --input) shows as a skeleton to fill in."""
    tree = to_dict(cfg)
    required = required_fields(cfg)
    for dotted in required:
        *sections, name = dotted.split(".")
        node = tree
        for section in sections:
            node = node[section]
        node[name] = None
    lines, stack = [], []  # stack: (indent, key) of the mappings above the current line
    for line in yaml.safe_dump(tree, sort_keys=False, allow_unicode=True).splitlines():
        indent = len(line) - len(line.lstrip(" "))
        key = line.strip().split(":", 1)[0]
        while stack and stack[-1][0] >= indent:
            stack.pop()
        dotted = ".".join([k for _, k in stack] + [key])
        stack.append((indent, key))
        lines.append(line + "  # required" if dotted in required and line.rstrip().endswith("null") else line)
    return "\n".join(lines) + "\n"


def required_fields(cfg: Any) -> list[str]:
    """Dotted names of the fields `cfg` still lacks (what `--print-config` marks "# required")."""
    out = [name.split("|")[0] for name in getattr(cfg, "REQUIRED", ())  # "a|b": either one
           if not any(getattr(cfg, n) for n in name.split("|"))]
    if model_required(cfg) and not cfg.model.path:
        out.append("model.path")
    return out


@dataclass(frozen=True)
class ImportanceConfig:
    """The paper's iterative greedy layer-importance search (PAPER.md, step 2)."""

    output: str = "outputs/importance"  # the output directory (fills as the search runs; resumable)
    component: Literal["decoder", "encoder"] = "decoder"  # encoder: the paper's audio-encoder ablation
    metric: str | None = None  # selection metric; None: chrf++ for German, chrf for Chinese (the paper)
    log_metrics: tuple[str, ...] = ("bleu", "chrf", "chrf++")  # metrics recorded for every candidate
    protect: tuple[int, ...] | None = None  # never removed; None: the first and the last layer
    rounds: int | None = 8  # layers to remove (one per round); None: until another stop applies
    target_layers: int | None = None  # stop when this many layers remain
    min_fraction: float | None = None  # stop when the best candidate scores below this x the unpruned score
    # Approximations (off by default, labelled as such in every output they touch):
    halving: bool = False  # successive halving over dev segments within a round
    halving_eta: int = 3  # halving: keep 1/eta of the candidates at each step
    halving_min_segments: int = 10  # halving: segments in the first, cheapest step
    prefilter: str | None = None  # proxy that pre-selects candidates: block_influence | tf_loss
    prefilter_keep: int = 8  # candidates per round kept for generation by the prefilter
    proxies: tuple[str, ...] = ()  # proxies logged for every candidate, with their rank correlation
    wait_timeout: float = 86400.0  # seconds a process waits for the other GPUs' candidates
    restart: bool = False  # discard an unfinished search in `output` (ours only) instead of resuming it
    comet: CometConfig = field(default_factory=CometConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)


@dataclass(frozen=True)
class PruneConfig:
    """Physically remove layers and save a model that loads with plain from_pretrained."""

    output: str = "outputs/prune"  # the output directory: a model directory plus manifest.json
    layers: tuple[int, ...] = ()  # decoder layers to remove (0-based, original numbering)
    importance: str | None = None  # an importance output: remove the first `num_layers` of its order
    num_layers: int | None = None  # with importance: how many of its removal order to remove; None: all
    encoder_layers: tuple[int, ...] = ()  # audio-encoder layers to remove
    check_segments: int = 4  # reload check: segments of `data` decoded before and after saving
    check_max_new_tokens: int = 16  # reload check: tokens decoded per segment
    model: ModelConfig = field(default_factory=lambda: ModelConfig(dtype="checkpoint"))
    data: DataConfig = field(default_factory=DataConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)  # the reload check's decoding

    def problems(self) -> list[str]:
        out = []
        if self.layers and self.importance:
            out.append("layers / importance: give one of --layers LIST and --importance DIR, not both")
        if self.num_layers is not None and not self.importance:
            fix = ("--layers already lists the layers; leave --num-layers out" if self.layers else
                   "give --importance DIR (an importance output, whose removal order it cuts), or --layers LIST")
            out.append(f"num_layers: only applies to an importance removal order; {fix}")
        if self.num_layers is not None and self.num_layers < 1:
            out.append("num_layers: must be at least 1 (or leave it out for the whole removal order)")
        if not self.layers and not self.importance and not self.encoder_layers:
            out.append("layers: nothing to remove; give --layers LIST (e.g. 1,3,9), --importance DIR "
                       "(an importance output) or --encoder-layers LIST")
        return out


@dataclass(frozen=True)
class DistillConfig:
    """Sequence-level KD data (PAPER.md step 3): references plus the teacher's translations."""

    output: str = "outputs/distill"  # the output directory (written whole at the end; an earlier one is replaced)
    on_error: Literal["fail", "skip"] = "fail"  # a bad item (unreadable audio, no reference): fail, or skip and list it
    teacher_only: bool = False  # leave the references out of examples.jsonl
    upsample: int = 1  # rows per kept teacher output (the paper's Model B trains on 10x KD data)
    # Quality filter (distil-whisper filters pseudo-labels by WER): drop teacher outputs whose
    # sentence score against the reference is below min_score; None: no filter.
    filter_metric: str = "chrf"
    min_score: float | None = None  # see filter_metric; e.g. 30
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
class VocabConfig:
    """`export --trim-vocab`: the texts whose tokens are kept (stcompress.vocab_trim)."""

    # Each entry's references (`data`) or a distill output's KD targets and teacher outputs
    # (`distilled`), as in finetune's `datasets` (YAML). All three empty: the training data the
    # finetune manifests upstream of the input record.
    datasets: tuple[DatasetMix, ...] = ()
    distilled: tuple[str, ...] = ()  # distill output directories (the command-line form of datasets)
    # datasets (as data.dataset) whose references are kept, read with the export's other data options
    references: tuple[str, ...] = ()
    keep_first: int = 0  # also keep the N lowest token ids (the BPE's most frequent pieces): a margin for unseen text


@dataclass(frozen=True)
class ExportConfig:
    """Merge LoRA in full precision, save, optionally quantize to NF4, prove the result reloads."""

    REQUIRED: ClassVar[tuple[str, ...]] = ("input",)

    output: str = "outputs/export"  # the output directory: the exported model, its card and manifest.json
    input: str = ""  # a finetune output (manifest.json + model/ or adapter/), or any model dir / hub id
    base_model: str | None = None  # LoRA / QLoRA: overrides the finetune manifest's base_model
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"  # merge and save in this (never in 4-bit)
    device: str = "auto"  # auto | cpu | cuda | cuda:N (the merge and the reload check)
    # after the merge: nf4 / int8 bitsandbytes, hqq 1-8 bit (4.57), autoround: calibrated 4-bit (compressed-tensors)
    quantize: Literal["none", "nf4", "int8", "hqq", "autoround"] = "none"
    bits: str = ""  # per component, e.g. decoder_layers=3,lm_head=8,audio_tower=4 (16 = kept in dtype; hqq default 4)
    group_size: int | None = None  # hqq / autoround: weights per scale group (None: hqq 64, autoround 128)
    calibration_samples: int = 128  # autoround: (clip, reference) pairs of the run's data fed through the inference prompt
    calibration_subset: Literal["all", "train", "dev", "test"] = "train"  # autoround: which part of `data` calibrates
    calibration_dataset: str | None = None  # another dataset to calibrate on (None: data.dataset)
    calibration_iters: int = 200  # AutoRound tuning steps per decoder layer (0: round to nearest, no tuning)
    # nf4: components left in `dtype`. embed_tokens always is (transformers' bitsandbytes path has no
    # 4-bit embedding); lm_head is kept by default, as transformers does.
    keep_unquantized: tuple[str, ...] = ("lm_head",)
    double_quant: bool = True  # nf4: also quantize the quantization constants
    scores: str | None = None  # an evaluate output (or its scores.json), shown in the model card
    check_segments: int = 4  # reload check: segments of `data` decoded before and after saving
    check_max_new_tokens: int = 16  # reload check: tokens decoded per segment
    check_min_agreement: float = 1.0  # nf4 reload check: greedy token agreement required (1.0 = exact)
    # Keep only the tokens of the target language's texts (vocab), slice embedding and LM head; before quantizing
    trim_vocab: bool = False
    vocab: VocabConfig = field(default_factory=VocabConfig)
    # Remove decoder layers before exporting, as prune does: the first num_layers of this importance
    # output's removal order (with size_budget and no num_layers: as many as the picker chooses).
    importance: str | None = None
    num_layers: int | None = None  # with importance: how many of its removal order to remove
    # Pick the configuration predicted to fit, e.g. 4GB (GB = 10^9 bytes, as the IWSLT track counts),
    # 1.5GiB (2^30), 500MB: layers (with importance) x format x bits per component; quantize other
    # than none, bits and num_layers fix their part; keep_unquantized is not used
    size_budget: str | None = None
    budget_formats: tuple[str, ...] = ()  # formats size_budget may pick, in order of preference; empty: all this environment writes
    budget_measure: Literal["both", "safetensors", "torch_save"] = "both"  # the measured bytes that must fit the budget
    # the lowest width size_budget may give a component it picks (2 allows hqq 2-bit; 3 or 4 trades layers for bits)
    budget_min_bits: int = 2
    data: DataConfig = field(default_factory=DataConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)  # the reload check's decoding

    def problems(self) -> list[str]:
        from stcompress.model.arch import QUANTIZABLE_COMPONENTS

        out = []
        if not self.input:
            out.append("input: required; give a finetune output directory or a model directory (--input DIR)")
        out += budget_problems(self)
        bad = [c for c in self.keep_unquantized if c not in QUANTIZABLE_COMPONENTS]
        if bad:
            hint = " (embed_tokens is never quantized)" if "embed_tokens" in bad else ""
            out.append(f"keep_unquantized: unknown component {bad[0]!r}{hint}; use any of {', '.join(QUANTIZABLE_COMPONENTS)}")
        from stcompress.quantize import bits_problems

        out += bits_problems(self.quantize, self.bits, tuple(self.keep_unquantized), self.group_size)
        if self.calibration_samples < 1:
            out.append("calibration_samples: must be at least 1 (autoround calibrates on the run's audio)")
        if self.calibration_iters < 0:
            out.append("calibration_iters: must be 0 (round to nearest) or more")
        if self.check_segments < 1:
            out.append("check_segments: must be at least 1 (every export is reload-checked)")
        if not 0 < self.check_min_agreement <= 1:
            out.append("check_min_agreement: must be in (0, 1]; 1.0 requires identical greedy output")
        if self.vocab.keep_first < 0:
            out.append("vocab.keep_first: must not be negative (0 keeps no margin)")
        if not self.trim_vocab and (self.vocab.datasets or self.vocab.distilled or self.vocab.references
                                    or self.vocab.keep_first):
            out.append("vocab: set only with trim_vocab; add --trim-vocab or drop the vocab options")
        return out


def budget_problems(cfg: Any) -> list[str]:
    """Size budget and layer-removal options of an export config, before anything loads."""
    from stcompress.budget import FORMAT_ORDER, parse_size

    out = []
    if cfg.size_budget is not None:
        try:
            parse_size(cfg.size_budget)
        except ValueError as exc:
            out.append(str(exc))
    bad = [f for f in cfg.budget_formats if f not in FORMAT_ORDER]
    if bad:
        out.append(f"budget_formats: unknown format {bad[0]!r}; use any of {', '.join(FORMAT_ORDER)}")
    if not 2 <= cfg.budget_min_bits <= 16:
        out.append(f"budget_min_bits: {cfg.budget_min_bits} is outside 2..16")
    if cfg.budget_formats and not cfg.size_budget:
        out.append("budget_formats: only used with size_budget; drop it, or give --size-budget")
    if cfg.budget_formats and cfg.quantize != "none":
        out.append("budget_formats / quantize: give one (quantize fixes the format the size budget may pick)")
    if cfg.num_layers is not None and not cfg.importance:
        out.append("num_layers: only applies to an importance removal order; give --importance DIR, or leave it out")
    if cfg.num_layers is not None and cfg.num_layers < 0:
        out.append("num_layers: must not be negative (0 removes nothing)")
    if cfg.importance and cfg.num_layers is None and not cfg.size_budget:
        out.append("num_layers: required with importance (how many of its removal order to remove), unless "
                   "size_budget picks it")
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

    r: int = 64  # adapter rank
    alpha: float = 128.0  # adapter scale numerator
    dropout: float = 0.0  # dropout on the adapter input, in [0, 1)
    rslora: bool = True  # scale alpha / sqrt(r) (rank-stabilised LoRA)
    # "all-linear" or module names (q_proj, fc1, ...); the LM head is never adapted.
    targets: tuple[str, ...] = ("all-linear",)
    audio_tower: bool = True  # adapt the audio encoder's linears too (the paper's 2.41% trainable)
    # qlora: peft's prepare_model_for_kbit_training (upcasts non-quantized weights to fp32, in memory only)
    prepare_kbit: bool = True
    # qlora: components loaded in full precision instead of NF4 (lm_head: transformers' default;
    # add audio_tower for a frozen encoder whose output train.cache_audio keeps anyway)
    keep_unquantized: tuple[str, ...] = ("lm_head",)
    # train the audio projector's full weights beside the adapters (peft modules_to_save) instead of
    # a LoRA on it: a new projector (an aligned pair of real parts) is not a low-rank change. Its
    # weights go into the adapter (0.3M for the testbed, 5.2M for Qwen2-Audio-7B).
    train_projector: bool = False


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation; defaults are the paper's teacher (3 epochs, batch 4, lr 1e-5, cosine, no warmup)."""

    epochs: int = 3  # passes over the training data
    max_steps: int | None = None  # optimizer steps; stops earlier than `epochs` when reached
    batch_size: int = 4  # per device
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-5  # peak learning rate (AdamW)
    weight_decay: float = 0.001  # on matrices only (biases and norms are not decayed)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"  # learning-rate schedule after warmup
    warmup_steps: int = 0  # optimizer steps of linear warmup
    max_grad_norm: float | None = 1.0  # None: no clipping
    max_length: int = 1024  # prompt (audio tokens included) + target + end-of-turn token
    on_too_long: Literal["fail", "skip"] = "fail"  # an example longer than max_length: fail, or skip it
    # Clips longer than the feature extractor's 30 s: "skip" them (their target describes audio the
    # model cannot hear), or "truncate" (train on the first 30 s, as inference would).
    long_audio: Literal["skip", "truncate"] = "skip"
    freeze_audio_tower: bool = False  # full: no updates to the audio encoder; lora: no adapters there
    # full: the language model (embeddings, decoder layers, LM head) stays as loaded; only the
    # projector (and the audio tower unless frozen) trains: the alignment warm-up of a new projector.
    freeze_language_model: bool = False
    # With freeze_audio_tower: run the audio tower once per clip, before training, and keep its output
    # in memory (~1.9 MB per 30 s clip for the 7B in bf16) instead of recomputing it every epoch.
    cache_audio: bool = False
    gradient_checkpointing: bool = False  # recompute activations in backward (less memory, slower)
    # adamw (torch); adamw_8bit / paged_adamw_8bit / paged_adamw (bitsandbytes, stcompress[quant]);
    # adafactor (torch, factored second moments, no first moment): optimizer-state memory per weight.
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw", "adafactor"] = "adamw"
    # full: fp32 master weights (bf16 autocast on GPU), or bf16 weights, gradients and update (half the
    # memory; updates below bf16's resolution, ~0.4% of a weight, are lost: see README).
    master_weights: Literal["fp32", "bf16"] = "fp32"
    loss_chunk: int = 0  # CE in chunks of this many target tokens, LM head recomputed in backward; 0: all at once
    fsdp: bool = False  # shard with FSDP2 through accelerate without an accelerate launch config (torchrun)
    mixed_precision: Literal["auto", "bf16", "fp16", "no"] = "auto"  # auto: bf16 on GPU, none on CPU
    seed: int = 0  # seed of shuffling, dropout and adapter initialisation
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
    limit: int | None = None  # dev segments used; None: all
    every: int = 0  # optimizer steps between evaluations; 0: at each epoch end
    metric: Literal["loss", "chrf"] = "loss"  # chrf: needs chrf_segments > 0
    patience: int = 0  # stop after this many evaluations without improvement; 0: never stop early
    chrf_segments: int = 0  # also translate this many dev segments (chrF++; chrF for zh/ja/ko)
    batch_size: int = 8  # dev segments per batch
    max_new_tokens: int = 128  # token limit of each dev translation (chrf_segments)


@dataclass(frozen=True)
class KDConfig:
    """Word-level KD (beyond the paper): loss = (1 - ratio) * CE + ratio * T^2 * KL(teacher || student)."""

    teacher: str | None = None  # a model directory (or stcompress output) sharing the student's tokenizer
    ratio: float = 0.0  # 0: off
    temperature: float = 1.0  # softmax temperature of both distributions
    teacher_4bit: bool = False  # load the teacher in NF4 to save memory


@dataclass(frozen=True)
class FinetuneConfig:
    """Full fine-tuning, LoRA or QLoRA of a Qwen2-Audio model on speech-translation pairs."""

    output: str = "outputs/finetune"  # the output directory: model/ (full) or adapter/ (lora, qlora)
    mode: Literal["full", "lora", "qlora"] = "full"  # full: every weight; lora: adapters; qlora: adapters on an NF4 base
    on_error: Literal["fail", "skip"] = "fail"  # a bad item (unreadable audio, no reference): fail, or skip and list it
    model: ModelConfig = field(default_factory=ModelConfig)  # dtype auto: fp32 weights for full, bf16 (GPU) for lora
    data: DataConfig = field(default_factory=DataConfig)  # the training data when `datasets` is empty
    datasets: tuple[DatasetMix, ...] = ()  # a mix (YAML only); replaces `data` as training data
    prompt: PromptConfig = field(default_factory=PromptConfig)
    lora: LoraOptions = field(default_factory=LoraOptions)
    train: TrainConfig = field(default_factory=TrainConfig)
    dev: DevConfig = field(default_factory=DevConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    dry_run: bool = False  # print the per-GPU peak-memory estimate for these options, then exit

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

        if self.lora.train_projector and self.mode == "full":
            out.append("lora.train_projector: is for mode lora / qlora (mode full trains the projector anyway)")
        if self.lora.train_projector and self.mode == "qlora" and "projector" not in self.lora.keep_unquantized:
            out.append("lora.train_projector: a 4-bit projector cannot train its own weights; add projector to "
                       "lora.keep_unquantized")
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
        if t.loss_chunk < 0:
            out.append(f"train.loss_chunk: {t.loss_chunk} is negative; use 0 (no chunking) or e.g. 128")
        if t.master_weights == "bf16" and self.mode != "full":
            out.append(f"train.master_weights: bf16 is for mode full; mode {self.mode} sets the base dtype with model.dtype")
        if t.master_weights == "bf16" and self.model.dtype not in ("auto", "bfloat16"):
            out.append(f"train.master_weights: bf16 contradicts model.dtype {self.model.dtype}; set model.dtype: auto")
        if t.freeze_language_model and self.mode != "full":
            out.append(f"train.freeze_language_model: is for mode full (mode {self.mode} trains adapters); "
                       "use mode: full to train the projector alone")
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

    REQUIRED: ClassVar[tuple[str, ...]] = ("recipe",)

    recipe: str = ""  # the recipe YAML (also accepted as the positional argument)
    dry_run: bool = False  # validate and print the plan (stage, output, inputs, skip or run), then exit
    from_stage: str | None = None  # rerun this stage and every later one, even if unchanged (--from)
    only: str | None = None  # run just this stage (its upstream outputs must be complete)
    size_budget: str | None = None  # set every export stage's size_budget (e.g. 4GB = 4 x 10^9 bytes)

    def problems(self) -> list[str]:
        out = []
        if not self.recipe:
            out.append("recipe: required; give a recipe file (stcompress run recipes/de-model-b.yaml)")
        if self.size_budget is not None:
            from stcompress.budget import parse_size

            try:
                parse_size(self.size_budget)
            except ValueError as exc:
                out.append(str(exc))
        if self.from_stage and self.only:
            out.append("from_stage / only: give one of --from and --only, not both")
        return out


@dataclass(frozen=True)
class SweepConfig:
    """`stcompress sweep`: a grid of exports (kept layers x precision x vocabulary), each evaluated on
    dev and test through the `stcompress run` machinery, and the quality-vs-bytes report."""

    REQUIRED: ClassVar[tuple[str, ...]] = ("run_dir", "input|inputs")

    run_dir: str = ""  # the run directory: sweep.yaml (the generated recipe), sweep.json, one directory per stage, report/
    input: str = ""  # the model to compress, as export's input: a finetune output or a model directory
    # More models swept beside `input` (or instead of it), each at its own depth (healed students):
    # NAME=PATH or PATH (NAME: the directory's name), e.g. teacher=runs/x/teacher-merged,h25=runs/x/export25;
    # their candidates are named NAME-L<layers>-<precision>
    inputs: tuple[str, ...] = ()
    base_model: str | None = None  # LoRA / QLoRA `input`: overrides the finetune manifest's base_model
    importance: str | None = None  # an importance output: its removal order gives `input`'s kept layers below its own
    layers: tuple[int, ...] = ()  # kept decoder layers of `input`'s candidates, e.g. 32,24,16; empty: its own only
    # Precision per candidate: bf16 | int8 | nf4 | hqq | hqqN (decoder, audio tower and projector in N bits),
    # optionally :COMPONENT=BITS,... (e.g. hqq3:lm_head=8); the LM head stays bf16 unless named
    precisions: tuple[str, ...] = ("bf16", "int8", "nf4")
    trim: tuple[bool, ...] = (False,)  # vocabulary trimmed (true), not (false), or both (false,true); true needs export's trim_vocab
    # The texts the trimmed candidates keep the tokens of (export's vocab.*); empty: each input's
    # training data recorded upstream. One set for every input makes their trimmed vocabularies equal.
    vocab: VocabConfig = field(default_factory=VocabConfig)
    metrics: tuple[str, ...] = ("chrf", "chrf++")  # evaluate's metrics (COMET: set comet.model)
    comet: CometConfig = field(default_factory=CometConfig)  # a COMET checkpoint scores every candidate; None: off
    dev: DataConfig = field(default_factory=lambda: DataConfig(subset="dev", dev_size=100))  # the dev split each candidate is scored on (and its reload check)
    test: DataConfig = field(default_factory=lambda: DataConfig(subset="test"))  # the test split each candidate is scored on
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"  # export dtype (merge, kept components)
    device: str = "auto"  # auto | cpu | cuda | cuda:N (export and evaluation)
    group_size: int = 64  # hqq: weights per scale/zero group
    check_segments: int = 2  # export reload check: dev segments decoded before and after saving
    prompt: PromptConfig = field(default_factory=PromptConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    restart: bool = False  # the inputs' content changed since the sweep began: redo every candidate
    dry_run: bool = False  # print the candidates and the plan; write and run nothing

    def problems(self) -> list[str]:
        from stcompress.languages import known_languages

        from stcompress.stages.sweep import inputs_problems, precision_problems

        out = [] if self.input or self.inputs else ["input: required; give the model to compress (--input DIR, or "
                                                   "--inputs NAME=DIR,... for models at their own depth)"]
        out += inputs_problems(self)
        if not self.run_dir:
            out.append("run_dir: required; the directory the sweep writes (--run-dir runs/de-sweep)")
        if not self.precisions:
            out.append("precisions: give at least one (e.g. bf16,int8,nf4)")
        if any(n < 1 for n in self.layers):
            out.append("layers: kept decoder layers must be at least 1")
        if len(set(self.layers)) != len(self.layers) or len(set(self.trim)) != len(self.trim) or not self.trim:
            out.append("layers / trim: list each value once (trim: false, true or false,true)")
        for name, data in (("dev", self.dev), ("test", self.test)):
            if data.target_lang not in known_languages():
                out.append(f"{name}.target_lang: unknown language code {data.target_lang!r}")
        if self.dev.target_lang != self.test.target_lang:
            out.append("dev.target_lang / test.target_lang: one language per sweep")
        out += precision_problems(self.precisions, self.group_size)
        if True not in self.trim and self.vocab != VocabConfig():
            out.append("vocab: applies to trimmed candidates only; add --trim false,true (or true) or drop the vocab options")
        return out


@dataclass(frozen=True)
class DemoConfig:
    """`stcompress demo`: the whole pipeline, offline on CPU, on the built-in speech-translation task."""

    run_dir: str = "runs/demo"  # where the demo run writes its stages and report
    target_lang: Literal["de", "zh"] = "de"  # the translation direction: English -> German or Chinese
    fresh: bool = False  # delete run_dir first (otherwise finished stages are skipped, as in `run`)


@dataclass(frozen=True)
class ReportConfig:
    """`stcompress report RUN_DIR`: render what the stages of a run wrote (never recomputes)."""

    REQUIRED: ClassVar[tuple[str, ...]] = ("run_dir",)

    run_dir: str = ""  # a `stcompress run` directory (or any directory holding stage outputs)
    output: str = ""  # default: <run_dir>/report
    title: str | None = None  # default: the run directory's name
    # The evaluate output every "% of teacher" is relative to (its directory name); default: the
    # one whose name contains "teacher", else the first evaluate output of the run.
    teacher: str | None = None

    def problems(self) -> list[str]:
        return [] if self.run_dir else ["run_dir: required; give the run directory (stcompress report runs/demo)"]
