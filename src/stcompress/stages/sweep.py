"""`stcompress sweep`: the quality-vs-bytes Pareto sweep, as a recipe over the `run` machinery.

The grid (kept layers x precision x trimmed or not) becomes one recipe: per candidate an export
stage (export-time layer removal from the importance order, the precision's format and bits) and
two evaluate stages (dev, test), then a report. `inputs` adds models at their own depth (the healed
students, which layer removal alone cannot make) crossed with the same precisions and trimming, so
one report and one frontier cover them all. It is written to <run_dir>/sweep.yaml and run
exactly as `stcompress run` runs any recipe, so resuming, skipping finished candidates (plan.json:
config, upstream and own manifest hashes) and the locks are the ones every run has; `stcompress run
<run_dir>/sweep.yaml` runs the same plan. <run_dir>/sweep.json lists the candidates for the report
and the content identities of the inputs: other content at the same paths is refused (--restart
redoes every candidate), as importance and finetune refuse to resume over changed inputs.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import transformers
import yaml

from stcompress import budget, quantize, vocab_trim
from stcompress.artifacts import atomic_write_json, atomic_write_text, content_identity, path_identity
from stcompress.config import ExportConfig, RunConfig, SweepConfig, VocabConfig, to_dict
from stcompress.errors import ConfigError, StcompressError
from stcompress.model import arch
from stcompress.outputs import claim

log = logging.getLogger(__name__)

RECIPE, RECORD = "sweep.yaml", "sweep.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")  # an input's name: the prefix of its candidates' stage names
_PRECISION = re.compile(r"^(bf16|none|int8|nf4|hqq)(\d*)(?::(.+))?$")


@dataclass(frozen=True)
class Point:
    """One candidate of the grid."""

    kept_layers: int
    num_layers: int | None  # removed from the importance order; None: no removal
    precision: str
    quantize: str
    bits: str
    trim: bool
    source: str | None = None  # the name of the `inputs` entry it comes from; None: `input`
    path: str = ""  # the model it is exported from

    @property
    def name(self) -> str:
        label = re.sub(r"[^A-Za-z0-9_-]+", "-", self.precision.replace("=", "")).strip("-")
        return (f"{self.source}-" if self.source else "") + f"L{self.kept_layers}-{label}" + ("-trim" if self.trim else "")


def parse_input(entry: str) -> tuple[str, str]:
    """'h25=runs/x/export25' -> ('h25', 'runs/x/export25'); 'runs/x/export25' -> ('export25', 'runs/x/export25')."""
    name, sep, path = entry.strip().partition("=")
    if not sep or "/" in name:  # a bare path (one holding "=" only after a "/")
        name, path = Path(entry.strip().rstrip("/")).name, entry.strip()
    return name.strip(), path.strip()


def inputs_problems(cfg: SweepConfig) -> list[str]:
    """Bad `inputs` entries and combinations, one line each, before anything loads."""
    out, names, paths = [], [], [cfg.input] if cfg.input else []
    for entry in cfg.inputs:
        name, path = parse_input(entry)
        if not path:
            out.append(f"inputs: {entry!r} names no model; give NAME=PATH (e.g. h25=runs/x/export25)")
        elif not _NAME.match(name):
            out.append(f"inputs: {entry!r}: {name!r} is not a usable name; give NAME=PATH, NAME of letters, digits, - and _")
        elif name in names:
            out.append(f"inputs: two inputs are named {name}; give each its own NAME=PATH")
        names.append(name)
        paths.append(path)
    given = [p for p in paths if p]
    seen = [str(Path(p).expanduser().resolve()) for p in given]
    if dup := next((p for p, r in zip(given, seen) if seen.count(r) > 1), None):
        out.append(f"inputs: {dup} is given twice (input, inputs); list each model once")
    if cfg.inputs and not cfg.input:
        for key, flag in (("layers", "--layers"), ("importance", "--importance"), ("base_model", "--base-model")):
            if getattr(cfg, key):
                out.append(f"{key}: applies to input (the model layers are removed from); inputs are swept at their "
                           f"own depth: give --input too, or drop {flag}")
    return out


def parse_precision(spec: str) -> tuple[str, str]:
    """'hqq3:lm_head=8' -> ('hqq', 'decoder_layers=3,audio_tower=3,projector=3,lm_head=8'); ValueError naming it."""
    match = _PRECISION.match(spec.strip())
    if not match or (match.group(2) and match.group(1) != "hqq"):
        raise ValueError(f"precisions: {spec!r} is not bf16, int8, nf4, hqq or hqqN, optionally :COMPONENT=BITS,... "
                         "(e.g. hqq3:lm_head=8)")
    fmt = "none" if match.group(1) in ("bf16", "none") else match.group(1)
    bits = [f"{c}={match.group(2)}" for c in ("decoder_layers", "audio_tower", "projector")] if match.group(2) else []
    if match.group(3):
        bits.append(match.group(3))
    return fmt, ",".join(bits)


def precision_problems(precisions: tuple[str, ...], group_size: int) -> list[str]:
    out = []
    for spec in precisions:
        try:
            fmt, bits = parse_precision(spec)
        except ValueError as exc:
            out.append(str(exc))
            continue
        out += [f"precisions: {spec}: {p}" for p in quantize.bits_problems(fmt, bits, ("lm_head",), group_size)]
    return out


def grid(cfg: SweepConfig, layers_now: int, order: list[int], present: list[int]) -> list[Point]:
    """Every candidate: kept layers (the input's own when none given) x precisions x trim."""
    reachable = {len(present) - len(removed): k for k, removed in budget.layer_options(order, present)}
    wanted = cfg.layers or (layers_now,)
    missing = [n for n in wanted if n not in reachable]
    if missing:
        how = (f"the importance order reaches {', '.join(map(str, sorted(reachable, reverse=True)))}" if cfg.importance
               else "give --importance (a layer-importance search) to remove layers")
        raise ConfigError([f"layers: {missing[0]} kept decoder layers cannot be made from the {layers_now}-layer input; {how}"])
    points = [Point(n, reachable[n] if reachable[n] else None, spec, *parse_precision(spec), trim, path=cfg.input)
              for n in wanted for spec in cfg.precisions for trim in cfg.trim]
    names = [p.name for p in points]
    if len(set(names)) != len(names):
        raise ConfigError([f"precisions: two candidates share the name {next(n for n in names if names.count(n) > 1)}; "
                           "list each precision once"])
    return points


def candidates(cfg: SweepConfig) -> list[Point]:
    """`input`'s grid, then each `inputs` model at its own depth x precisions x trim."""
    points = grid(cfg, *_layers(cfg)) if cfg.input else []
    for entry in cfg.inputs:
        name, path = parse_input(entry)
        depth = _depth(path)
        points += [Point(depth, None, spec, *parse_precision(spec), trim, source=name, path=path)
                   for spec in cfg.precisions for trim in cfg.trim]
    names = [p.name for p in points]
    if len(set(names)) != len(names):
        raise ConfigError([f"inputs: two candidates share the name {next(n for n in names if names.count(n) > 1)}; "
                           "rename an input (NAME=PATH)"])
    return points


def _export_config(cfg: SweepConfig, p: Point) -> dict[str, Any]:
    out: dict[str, Any] = {"input": p.path, "dtype": cfg.dtype, "device": cfg.device, "quantize": p.quantize, "bits": p.bits,
                           "group_size": cfg.group_size, "check_segments": cfg.check_segments,
                           "data": to_dict(cfg.dev), "prompt": to_dict(cfg.prompt), "generation": to_dict(cfg.generation)}
    if cfg.base_model and p.source is None:
        out["base_model"] = cfg.base_model
    if p.num_layers is not None:
        out |= {"importance": cfg.importance, "num_layers": p.num_layers}
    if p.trim:
        out["trim_vocab"] = True  # export's vocabulary-trimming option
        if cfg.vocab != VocabConfig():  # left out when unset: earlier sweeps' candidates keep their config hashes
            out["vocab"] = to_dict(cfg.vocab)
    return out


def _evaluate_config(cfg: SweepConfig, p: Point, data: Any) -> dict[str, Any]:
    dtype = "float32" if p.quantize == "hqq" else "auto"  # transformers 4.57's HQQ loader computes in float32
    return {"model": {"path": f"${{{p.name}}}", "device": cfg.device, "dtype": dtype}, "data": to_dict(data),
            "metrics": list(cfg.metrics), "comet": to_dict(cfg.comet), "prompt": to_dict(cfg.prompt),
            "generation": to_dict(cfg.generation)}


def recipe(cfg: SweepConfig, points: list[Point]) -> dict[str, Any]:
    stages: list[dict[str, Any]] = []
    for p in points:
        stages.append({"name": p.name, "stage": "export", "config": _export_config(cfg, p)})
        stages.append({"name": f"{p.name}-dev", "stage": "evaluate", "config": _evaluate_config(cfg, p, cfg.dev)})
        stages.append({"name": f"{p.name}-test", "stage": "evaluate", "config": _evaluate_config(cfg, p, cfg.test)})
    stages.append({"name": "report", "stage": "report", "config": {"run_dir": "${run_dir}"}})
    models = ", ".join(dict.fromkeys(p.path for p in points))
    return {"description": f"stcompress sweep of {models}: {len(points)} candidates", "run_dir": cfg.run_dir,
            "stages": stages}


def identities(cfg: SweepConfig) -> dict[str, Any]:
    """Content (no paths) of every local input the candidates read."""
    named = {"input": cfg.input, "base_model": cfg.base_model, "importance": cfg.importance,
             "dev.dataset": cfg.dev.dataset, "test.dataset": cfg.test.dataset}
    named |= {f"inputs.{name}": path for name, path in map(parse_input, cfg.inputs)}
    return {k: content_identity(path_identity(v)) for k, v in named.items() if v and Path(v).expanduser().exists()}


def _depth(path: str) -> int:
    """Decoder layers of an `inputs` model (a model directory, or the base of a finetune output)."""
    from stcompress.stages.export import resolve_source

    source = resolve_source(ExportConfig(input=path))
    return arch.text_config(transformers.AutoConfig.from_pretrained(source.model_path)).num_hidden_layers


def _layers(cfg: SweepConfig) -> tuple[int, list[int], list[int]]:
    from stcompress.stages.export import lineage, resolve_source

    source = resolve_source(ExportConfig(input=cfg.input, base_model=cfg.base_model))
    layers_now = arch.text_config(transformers.AutoConfig.from_pretrained(source.model_path)).num_hidden_layers
    if not cfg.importance:
        return layers_now, [], list(range(layers_now))
    order, present = budget.present_layers(cfg.importance, layers_now, lineage(source))
    return layers_now, order, present


def int8_problems(cfg: SweepConfig, points: list[Point]) -> list[str]:
    """The int8 candidates whose export would be refused (quantize.int8_problems: a layer bitsandbytes'
    CUDA int8 matmul cannot run), all named at once before anything is exported."""
    from stcompress.stages.export import resolve_source

    out: list[str] = []
    configs: dict[str, Any] = {}
    found: dict[tuple[str, int, str], list[str]] = {}  # layer counts share shapes: one meta model per input, rows, bits
    for p in points:
        if p.quantize != "int8":
            continue
        if p.path not in configs:
            source = resolve_source(ExportConfig(input=p.path, base_model=cfg.base_model if p.source is None else None))
            configs[p.path] = transformers.AutoConfig.from_pretrained(source.model_path)
        config = configs[p.path]
        rows = arch.text_config(config).vocab_size
        if p.trim:  # the trimmed rows are a multiple of vocab_trim.ROW_MULTIPLE
            rows = -(-rows // vocab_trim.ROW_MULTIPLE) * vocab_trim.ROW_MULTIPLE
        key = (p.path, rows, p.bits)
        if key not in found:
            chosen = quantize.component_bits("int8", p.bits, ExportConfig().keep_unquantized)
            found[key] = quantize.int8_problems("int8", chosen, config, vocab_size=rows)
        out += [f"candidate {p.name}: {problem}" for problem in found[key]]
    return out


def _check_content(run_dir: Path, found: dict[str, Any], restart: bool) -> bool:
    """Whether every candidate must be redone: the inputs' content differs from the sweep's record."""
    path = run_dir / RECORD
    if not path.is_file():
        return False
    record = json.loads(path.read_text(encoding="utf-8"))
    recorded = record.get("inputs", {})
    # An `inputs` model added to the sweep (or left out) changes no finished candidate of another
    changed = sorted(k for k in found.keys() | recorded.keys() if found.get(k) != recorded.get(k)
                     and not (k.startswith("inputs.") and (k not in found or k not in recorded)))
    if changed and not restart:
        raise StcompressError(f"{changed[0]}: its content differs from what this sweep used ({path}); pass --restart to "
                              "redo every candidate, or give another run_dir")
    return bool(changed) or bool(record.get("redo"))  # a redo that was interrupted is not finished


def run(cfg: SweepConfig, *, progress: bool = True) -> Path:
    from stcompress.stages import run as runner

    if problems := cfg.problems():
        raise ConfigError(problems)
    run_dir = Path(cfg.run_dir)
    points = candidates(cfg)
    if problems := int8_problems(cfg, points):
        raise ConfigError(problems)
    data = recipe(cfg, points)
    path = run_dir / RECIPE
    parsed = runner.parse_recipe(path, data)  # every stage config validated, all problems at once
    found = identities(cfg)
    for p in points:
        log.info("candidate %s: %s, %d layers, %s%s", p.name, p.path, p.kept_layers, p.precision, ", trimmed" if p.trim else "")
    if cfg.dry_run:
        decisions = runner.decide(parsed, RunConfig(recipe=str(path)))
        print(runner.format_plan(parsed, decisions))
        if problems := runner.check_inputs(parsed, decisions):
            raise ConfigError(problems)
        return run_dir
    with claim(run_dir, in_place=(runner.PLAN, "manifest.json", RECIPE, RECORD), shared=True, item="run_dir"):
        run_dir.mkdir(parents=True, exist_ok=True)
        redo = _check_content(run_dir, found, cfg.restart) or cfg.restart
        atomic_write_text(path, yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
        record = {"config": to_dict(cfg), "inputs": found, "recipe": RECIPE, "candidates": [_record(p) for p in points]}
        atomic_write_json(run_dir / RECORD, record | {"redo": redo})
        runner.run(RunConfig(recipe=str(path), from_stage=points[0].name if redo else None), progress=progress)
        atomic_write_json(run_dir / RECORD, record | {"redo": False})
    return run_dir


def _record(p: Point) -> dict[str, Any]:
    return {"name": p.name, "input": p.source, "input_path": p.path, "kept_layers": p.kept_layers, "num_layers": p.num_layers, "precision": p.precision,
            "quantize": p.quantize, "bits": p.bits, "trim": p.trim, "dev": f"{p.name}-dev", "test": f"{p.name}-test"}
