"""`stcompress run RECIPE.yaml`: the stages a recipe lists, each into <run_dir>/<name>, in order.

A recipe (YAML):

    run_dir: runs/de-model-b
    defaults:                       # merged into every stage config that has these sections
      data: {dataset: ymoslem/ACL-6060, target_lang: de}
      generation: {batch_size: 32}
    stages:
      - {name: teacher, stage: finetune, config: {mode: full, model: {path: Qwen/Qwen2-Audio-7B-Instruct}}}
      - {name: kd, stage: distill, config: {model: {path: "${teacher}"}}}
      - {name: eval, stage: evaluate, config: {model: {path: "${teacher.model}"}}}

References: inside any string of a stage config, `${NAME}` is the output directory of the earlier
stage NAME, `${NAME.SUB}` the path SUB inside it (`${teacher.model}` = <run_dir>/teacher/model),
and `${run_dir}` the run directory (a stage using it counts as reading every earlier stage). A
stage's `output` is always <run_dir>/<name>. `defaults` sections are merged under each stage's
config (top-level sections only; of `data`, only `target_lang` reaches the entries of finetune's
`datasets` list that set none): keys the stage sets win.

Skip-on-unchanged: <run_dir>/plan.json records, per finished stage, the hash of its resolved config,
the hashes of the manifests of the stages it references, and the hash of its own manifest. A stage
whose record still matches all three is skipped, so an interrupted run resumes at the first stage
without a complete output (a stage resumes within itself where it supports that: importance,
finetune). `from_stage` / `only` force reruns.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import logging
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from stcompress.artifacts import MANIFEST, atomic_write_json, build_manifest, file_hash, reading, write_manifest
from stcompress.config import RunConfig, load_config, read_yaml, to_dict
from stcompress.errors import ConfigError, StcompressError
from stcompress.outputs import claim, remove_output
from stcompress.progress import stage as stage_status

log = logging.getLogger(__name__)

PLAN = "plan.json"
DEFAULT_SECTIONS = ("data", "prompt", "model", "generation")
_REF = re.compile(r"\$\{([A-Za-z0-9_-]+)(?:\.([^}]+))?\}")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


def stage_types() -> dict[str, type]:
    """Stage type -> config class: every CLI command except the runner itself."""
    from stcompress.cli import COMMANDS, RUNNERS

    return {name: cmd.config_cls for name, cmd in COMMANDS.items() if name not in RUNNERS}


@dataclass
class Step:
    """One stage of a recipe, resolved."""

    name: str
    stage: str
    output: Path
    config: Any  # the stage's frozen config
    reads: list[str] = field(default_factory=list)  # earlier stages it references

    def config_hash(self) -> str:
        text = json.dumps(to_dict(self.config), sort_keys=True, ensure_ascii=False, default=str)
        return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class Recipe:
    path: Path
    run_dir: Path
    steps: list[Step]

    def step(self, name: str) -> Step:
        return next(s for s in self.steps if s.name == name)


# ---------------------------------------------------------------------------------------------
# Parsing and validation (every problem at once)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _inherit_language(config: dict[str, Any], defaults: dict[str, Any]) -> None:
    """A finetune `datasets` entry without its own data.target_lang takes the recipe's default one.

    Other data defaults (dataset, split, sizes) describe the main dataset and stay out of a mix;
    the language is the run's, and a mix entry silently training on another one is never wanted.
    """
    lang = (defaults.get("data") or {}).get("target_lang")
    mixes = config.get("datasets")
    if lang is None or not isinstance(mixes, list):
        return
    for mix in mixes:
        if isinstance(mix, dict) and isinstance(mix.get("data"), dict) and "target_lang" not in mix["data"]:
            mix["data"] = {**mix["data"], "target_lang": lang}


def _substitute(value: Any, refs: dict[str, Path], where: str, problems: list[str], used: list[str]) -> Any:
    if isinstance(value, dict):
        return {k: _substitute(v, refs, f"{where}.{k}", problems, used) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, refs, f"{where}[{i}]", problems, used) for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def repl(match: re.Match) -> str:
        name, sub = match.group(1), match.group(2)
        if name not in refs:
            known = ", ".join(refs) or "none"
            problems.append(f"{where}: ${{{name}}} names no earlier stage; earlier stages (and run_dir): {known}")
            return match.group(0)
        if name not in used:
            used.append(name)
        return str(refs[name] / sub) if sub else str(refs[name])

    return _REF.sub(repl, value)


def _stage_problems(i: int, entry: Any, types: dict[str, type], seen: set[str]) -> list[str]:
    if not isinstance(entry, dict):
        return [f"stages[{i}]: expected a mapping with name, stage and config"]
    out = []
    unknown = set(entry) - {"name", "stage", "config"}
    if unknown:
        out.append(f"stages[{i}]: unknown keys {sorted(unknown)}; a stage has name, stage and config")
    name, stage = entry.get("name"), entry.get("stage")
    if not isinstance(name, str) or not _NAME.match(name) or name == "run_dir":
        out.append(f"stages[{i}].name: {name!r} is not a usable name; use letters, digits, - and _ (not run_dir)")
    elif name in seen:
        out.append(f"stages[{i}].name: {name!r} is used twice; stage names must be unique")
    if stage not in types:
        out.append(f"stages[{i}] ({name}).stage: unknown stage {stage!r}; use one of {', '.join(types)}")
    config = entry.get("config", {})
    if config is not None and not isinstance(config, dict):
        out.append(f"stages[{i}] ({name}).config: expected a mapping of the {stage} stage's settings")
    elif isinstance(config, dict) and "output" in config:
        out.append(f"stages[{i}] ({name}).config.output: set by the runner (<run_dir>/{name}); remove it")
    return out


def parse_recipe(path: str | Path, data: dict[str, Any] | None = None) -> Recipe:
    """Validate the whole recipe, every stage config included; raise one ConfigError listing all problems."""
    path = Path(path)
    data = read_yaml(path) if data is None else data
    problems: list[str] = []
    unknown = set(data) - {"run_dir", "defaults", "stages", "description"}
    if unknown:
        problems.append(f"{sorted(unknown)}: unknown top-level keys; a recipe has run_dir, defaults, stages (and description)")
    run_dir = data.get("run_dir")
    if not isinstance(run_dir, str) or not run_dir:
        problems.append("run_dir: required; the directory the stages write into, e.g. runs/de-model-b")
        run_dir = "."
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict) or any(k not in DEFAULT_SECTIONS or not isinstance(v, dict) for k, v in defaults.items()):
        problems.append(f"defaults: expected a mapping of sections ({', '.join(DEFAULT_SECTIONS)}), each a mapping")
        defaults = {}
    entries = data.get("stages")
    if not isinstance(entries, list) or not entries:
        problems.append("stages: required; a list of {name, stage, config} entries")
        entries = []
    types = stage_types()
    refs: dict[str, Path] = {"run_dir": Path(run_dir)}
    steps: list[Step] = []
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        own = _stage_problems(i, entry, types, seen)
        problems.extend(own)
        if own:
            if isinstance(entry, dict) and isinstance(entry.get("name"), str):
                seen.add(entry["name"])
            continue
        name, stage, cls = entry["name"], entry["stage"], types[entry["stage"]]
        seen.add(name)
        fields = {f for f in cls.__dataclass_fields__}
        merged = _merge({k: v for k, v in defaults.items() if k in fields}, entry.get("config") or {})
        _inherit_language(merged, defaults)
        used: list[str] = []
        resolved = _substitute(merged, refs, f"{name}.config", problems, used)
        output = Path(run_dir) / name
        if "output" in fields:
            resolved["output"] = str(output)
        try:
            cfg = load_config(cls, resolved)
        except ConfigError as exc:
            problems.extend(f"{name} ({stage}): {p}" for p in exc.problems)
        else:
            # ${run_dir} reads every earlier stage (a report): it reruns whenever any of them does
            reads = [s.name for s in steps] if "run_dir" in used else used
            steps.append(Step(name, stage, output, cfg, reads))
        refs[name] = output
    if problems:
        raise ConfigError([f"{path}: {p}" for p in problems])
    return Recipe(path=path, run_dir=Path(run_dir), steps=steps)


# ---------------------------------------------------------------------------------------------
# The plan: what runs, what is skipped and why


def _manifest_hash(directory: Path) -> str | None:
    path = directory / MANIFEST
    return file_hash(path)["sha256"] if path.is_file() else None


def read_plan(run_dir: Path) -> dict[str, Any]:
    path = run_dir / PLAN
    if not path.is_file():
        return {"stages": {}}
    with reading(path, "delete it to rerun every stage (finished outputs are kept, and rerun)"):
        return json.loads(path.read_text(encoding="utf-8"))


def decide(recipe: Recipe, cfg: RunConfig) -> dict[str, str]:
    """Stage name -> why it runs ("run: ...") or is skipped ("skip: ...")."""
    names = [s.name for s in recipe.steps]
    for flag, value in (("from", cfg.from_stage), ("only", cfg.only)):
        if value and value not in names:
            raise StcompressError(f"--{flag}: no stage named {value!r} in {recipe.path}; stages: {', '.join(names)}")
    records = read_plan(recipe.run_dir)["stages"]
    start = names.index(cfg.from_stage) if cfg.from_stage else None
    out: dict[str, str] = {}
    for i, step in enumerate(recipe.steps):
        rerun = [r for r in step.reads if out[r].startswith("run")]
        if cfg.only:
            out[step.name] = "run: --only" if step.name == cfg.only else "skip: not --only"
            continue
        if start is not None and i >= start:
            out[step.name] = "run: --from " + cfg.from_stage
            continue
        record, mhash = records.get(step.name), _manifest_hash(step.output)
        if mhash is None:
            out[step.name] = "run: no complete output"
        elif start is not None:
            out[step.name] = "skip: before --from"
        elif not record or record.get("manifest_sha256") != mhash:
            out[step.name] = "run: output not made by this run (or changed since)"
        elif record.get("config_sha256") != step.config_hash():
            out[step.name] = "run: config changed"
        elif rerun:
            out[step.name] = f"run: upstream {', '.join(rerun)} reruns"
        elif any(record.get("upstream", {}).get(r) != _manifest_hash(recipe.step(r).output) for r in step.reads):
            out[step.name] = "run: an upstream output changed"
        else:
            out[step.name] = "skip: unchanged"
    return out


def format_plan(recipe: Recipe, decisions: dict[str, str]) -> str:
    lines = [f"recipe {recipe.path} -> {recipe.run_dir}"]
    for i, step in enumerate(recipe.steps, 1):
        earlier = [s.name for s in recipe.steps[: i - 1]]
        reads = "every earlier stage" if len(earlier) > 2 and step.reads == earlier else ", ".join(step.reads) or "-"
        lines.append(f"{i:>2}. {step.name:<14} {step.stage:<10} -> {step.output}   reads: {reads}   [{decisions[step.name]}]")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Running


def _check_upstream(recipe: Recipe, decisions: dict[str, str]) -> None:
    """Skipped stages that a running stage reads must have complete outputs."""
    for step in recipe.steps:
        if not decisions[step.name].startswith("run"):
            continue
        for r in step.reads:
            if decisions[r].startswith("skip") and _manifest_hash(recipe.step(r).output) is None:
                raise StcompressError(f"{step.name}: reads {r}, which has no complete output in {recipe.step(r).output}; "
                                      f"run without --only / --from, or with --from {r}")


def _save_plan(recipe: Recipe, plan: dict[str, Any]) -> None:
    plan["recipe"] = str(recipe.path)
    plan["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    plan["order"] = [s.name for s in recipe.steps]
    atomic_write_json(recipe.run_dir / PLAN, plan)


def _run_step(recipe: Recipe, step: Step, plan: dict[str, Any], progress: bool) -> None:
    record: dict[str, Any] = {"stage": step.stage, "output": str(step.output), "status": "running",
                              "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    plan["stages"][step.name] = record
    _save_plan(recipe, plan)
    if _manifest_hash(step.output) is not None and step.output.is_dir():
        remove_output(step.output)  # a complete but stale output of ours: some stages refuse to overwrite one
    log.info("stage %s (%s) -> %s", step.name, step.stage, step.output)
    t0 = time.perf_counter()
    try:
        number = recipe.steps.index(step) + 1
        with stage_status(f"[{number}/{len(recipe.steps)}] {step.name} ({step.stage})"):
            importlib.import_module(f"stcompress.stages.{step.stage}").run(step.config, progress=progress)
    except BaseException as exc:
        status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"  # Ctrl-C, SIGTERM, SIGHUP
        record.update(status=status, seconds=round(time.perf_counter() - t0, 3), error=str(exc)[:500] or type(exc).__name__)
        _save_plan(recipe, plan)
        raise
    record.update(status="done", seconds=round(time.perf_counter() - t0, 3),
                  finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  config_sha256=step.config_hash(), manifest_sha256=_manifest_hash(step.output),
                  upstream={r: _manifest_hash(recipe.step(r).output) for r in step.reads})
    _save_plan(recipe, plan)


def check_inputs(recipe: Recipe, decisions: dict[str, str]) -> list[str]:
    """Inputs of the stages that will run which are not made by the run itself (placeholders,
    typos), every one at once."""
    from stcompress import preflight

    made = [recipe.run_dir.resolve(), *(s.output.resolve() for s in recipe.steps)]

    def made_later(value: str) -> bool:
        path = Path(value).expanduser().resolve()
        return path == made[0] or any(path == m or m in path.parents for m in made[1:])

    return [f"{recipe.path}: {step.name} ({step.stage}): {p}" for step in recipe.steps
            if decisions[step.name].startswith("run") for p in preflight.check_inputs(step.config, made_later)]


def with_size_budget(recipe: Recipe, size_budget: str | None) -> Recipe:
    """`run --size-budget`: every export stage that no other export reads (a bf16 merge feeding an
    NF4 export stays as it is) gets it; its config hash changes, so it reruns."""
    if not size_budget:
        return recipe
    feeding = {r for s in recipe.steps if s.stage == "export" for r in s.reads}
    exports = [s for s in recipe.steps if s.stage == "export" and s.name not in feeding]
    if not exports:
        raise ConfigError([f"size_budget: {recipe.path} has no export stage to apply it to; drop --size-budget"])
    for step in exports:
        step.config = dataclasses.replace(step.config, size_budget=size_budget)
        if problems := step.config.problems():
            raise ConfigError([f"{recipe.path}: {step.name} (export) with --size-budget: {p}" for p in problems])
    return recipe


def run(cfg: RunConfig, *, progress: bool = True) -> Path:
    recipe = with_size_budget(parse_recipe(cfg.recipe), cfg.size_budget)
    decisions = decide(recipe, cfg)
    print(format_plan(recipe, decisions))
    problems = check_inputs(recipe, decisions)
    if problems:
        raise ConfigError(problems)
    if cfg.dry_run:
        return recipe.run_dir
    _check_upstream(recipe, decisions)
    own = (PLAN, MANIFEST)  # the run dir may hold the user's files too; each stage claims its own output
    with claim(recipe.run_dir, in_place=own, shared=True, item="run_dir"):
        recipe.run_dir.mkdir(parents=True, exist_ok=True)
        plan = read_plan(recipe.run_dir)
        t0 = time.perf_counter()
        for step in recipe.steps:
            if decisions[step.name].startswith("skip"):
                if step.name in plan["stages"]:
                    plan["stages"][step.name]["last_decision"] = decisions[step.name]
                log.info("stage %s: %s", step.name, decisions[step.name])
                continue
            _run_step(recipe, step, plan, progress)
        manifest = build_manifest("run", to_dict(cfg), {"recipe": file_hash(recipe.path)}, {"total": time.perf_counter() - t0},
                                  stages={s.name: {"stage": s.stage, "decision": decisions[s.name]} for s in recipe.steps})
        write_manifest(recipe.run_dir, manifest, entries=[PLAN, *(s.output.name for s in recipe.steps)])
    return recipe.run_dir
