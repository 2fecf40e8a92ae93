"""Rebuild a testbed system on any CPU from the registry-built base model and small artifacts.

The GPU run keeps only what cannot be rebuilt from the registries (collect_artifacts.py): the
projector the frozen-LM warm-up trained, the LoRA / QLoRA adapters (fp16), every stage's manifest
(removed layers, base models, settings). A system is rebuilt by replaying its chain through our
own stage functions, read from those manifests: a frozen-LM full fine-tune = its base with the
projector swapped in; an adapter stage = `export` merging it into its rebuilt base in fp32 (as the
GPU export did); a prune = `prune` of the recorded layers. Nothing here merges or cuts by itself.

    DIR/projector.safetensors        multi_modal_projector.* of the warm-up stage (metadata: stage)
    DIR/<stage>/manifest.json        every stage (finetune, prune, export, ...)
    DIR/<stage>/adapter/             adapter_config.json + adapter_model.safetensors (LoRA / QLoRA)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from stcompress.artifacts import (MANIFEST, atomic_write_json, build_manifest, path_identity, read_manifest, staged_output,
                                  write_manifest)
from stcompress.config import DataConfig, ExportConfig, ModelConfig, PruneConfig, load_config
from stcompress.errors import ModelError

log = logging.getLogger(__name__)

ALIASES = {"teacher": ("teacher-merged", "teacher"), "final25": ("export25",), "final50": ("export50",)}
PROJECTOR = "projector.safetensors"
CHECK_DATA = "builtin:demo-dev"  # reload checks need a few clips; the package ships these (no testbed data)


def stage_name(artifacts: Path, system: str) -> str:
    for name in ALIASES.get(system, (system,)):
        if (artifacts / name / MANIFEST).is_file():
            return name
    known = sorted(p.name for p in artifacts.iterdir() if (p / MANIFEST).is_file()) if artifacts.is_dir() else []
    raise ModelError(f"system: {system!r} has no manifest in {artifacts}; use one of "
                     f"{', '.join([*ALIASES, *known]) or '(none: is --artifacts the unpacked results folder?)'}")


def recorded_stage(artifacts: Path, recorded: str | None) -> str | None:
    """The stage a recorded path names (`<run_dir>/<stage>[/model|/adapter]`); None: the base model."""
    if not recorded:
        return None
    path = Path(recorded)
    if path.name in ("model", "adapter"):
        path = path.parent
    return path.name if (artifacts / path.name / MANIFEST).is_file() else None


class Rebuilder:
    """Rebuilds stages by name, each once, intermediates in `work`."""

    def __init__(self, base: Path, artifacts: Path, work: Path, check_data: str = CHECK_DATA, device: str = "cpu"):
        if not (base / "config.json").is_file():
            raise ModelError(f"base: {base} is not a model directory; build it with python -m stcompress.testbed build-model")
        self.base, self.artifacts, self.work = base.resolve(), artifacts, work
        self.check_data, self.device = check_data, device
        self.done: dict[str, Path] = {}
        self.notes: dict[str, dict[str, Any]] = {}  # per stage: what a rebuild could not match exactly

    # -- the chain ---------------------------------------------------------------------------

    def name_of(self, recorded: str | None) -> str | None:
        return recorded_stage(self.artifacts, recorded)

    def manifest(self, name: str) -> dict[str, Any]:
        return read_manifest(self.artifacts / name)

    def build(self, name: str | None, output: Path | None = None) -> Path:
        if name is None:
            return self.base
        if name in self.done and output is None:
            return self.done[name]
        m = self.manifest(name)
        out = output or self.work / name
        stage, mode = m.get("stage"), m.get("mode") or (m.get("config") or {}).get("mode")
        log.info("rebuild %s (%s%s) -> %s", name, stage, f", {mode}" if mode else "", out)
        if stage == "finetune" and mode in ("lora", "qlora"):
            path = self._merge(name, m, out)
        elif stage == "finetune" and mode == "full":
            path = self._projector(name, m, out)
        elif stage == "prune":
            path = self._prune(name, m, out)
        elif stage == "export":
            path = self._export(name, m, out)
        else:
            raise ModelError(f"{self.artifacts / name / MANIFEST}: a {stage} stage makes no model; rebuild a model stage")
        self.done[name] = path
        return path

    def missing_files(self, name: str, missing: list[str]) -> list[tuple[str, Path]]:
        """Where the files a stage's manifest lists but collect_artifacts did not keep come from: a
        merged or pruned model's weights from its rebuild; an adapter's processor files (tokenizer.json,
        dropped for size) from the model it was trained on, whose processor it saved; KD data over
        collect_artifacts' size cap from the rebuilt teacher translating the training data again."""
        if not missing:
            return []
        m = self.manifest(name)
        if m.get("stage") == "finetune":
            source = self.build(self.name_of(m.get("base_model") or m["config"]["model"]["path"]))
            found = [(f, source / Path(f).name) for f in missing]
        elif m.get("stage") == "distill":
            out = self._distill(name, m)
            found = [(f, out / f) for f in missing]
        else:
            model = self.build(name)
            found = [(f, model / f) for f in missing]
        for f, path in found:
            if not path.is_file():
                raise ModelError(f"{name}: {f} (its manifest lists it) was not collected and its rebuild has none at "
                                 f"{path}; the artifacts do not match this version of rebuild")
        return found

    def _distill(self, name: str, m: dict[str, Any]) -> Path:
        """KD data the run did not keep: the rebuilt teacher translates the recorded training data
        again with the recorded settings (greedy: the same outputs up to the adapters' fp16 rounding).
        Its counts go to `notes` beside the recorded ones."""
        from stcompress.config import DistillConfig
        from stcompress.stages import distill

        cfg = dict(m.get("config") or {})
        teacher = self.build(self.name_of(cfg["model"]["path"]))
        out = self.work / name
        dcfg = load_config(DistillConfig, cfg | {"output": str(out),
                                                 "model": dict(cfg["model"], path=str(teacher), device=self.device)})
        distill.run(dcfg, progress=False)
        self.notes[name] = {"counts_recorded": m.get("counts"), "counts_rebuilt": read_manifest(out).get("counts")}
        return out

    def _check_data(self, recorded: dict[str, Any] | None, lang: str | None = None) -> dict[str, Any]:
        """The recorded data options, on the check clips: only the reload checks read them."""
        fields = {f.name for f in dataclasses.fields(DataConfig)}
        data = {k: v for k, v in (recorded or {}).items() if k in fields} | ({"target_lang": lang} if lang else {})
        return data | {"dataset": self.check_data, "limit": None, "reference_column": None, "subset": "all"}

    def _merge(self, name: str, m: dict[str, Any], out: Path) -> Path:
        """An adapter merged into its rebuilt base in fp32: the export stage, as the GPU export ran."""
        adapter = self.artifacts / name / "adapter"
        if not (adapter / "adapter_config.json").is_file():
            raise ModelError(f"{adapter}: no adapter_config.json; the artifacts of {name} are incomplete (collect them again)")
        base = self.build(self.name_of(m.get("base_model") or m["config"]["model"]["path"]))
        return self._run_export({"input": str(self.artifacts / name), "dtype": "float32",
                                 "data": self._check_data(None, m.get("target_lang"))}, base, out)

    def _export(self, name: str, m: dict[str, Any], out: Path) -> Path:
        cfg = m.get("config") or {}
        if cfg.get("quantize", "none") != "none":
            raise ModelError(f"{name}: a quantized ({cfg['quantize']}) export; rebuild its input ({self.name_of(cfg.get('input'))}) and "
                             "export that with stcompress export --quantize")
        source = self.name_of(cfg.get("input"))
        kind = (m.get("source") or {}).get("kind")
        if kind in ("lora", "qlora"):
            if source is None:
                raise ModelError(f"{name}: its input {cfg.get('input')} is not among the artifacts")
            fm = self.manifest(source)
            base = self.build(self.name_of(fm.get("base_model") or fm["config"]["model"]["path"]))
            recorded = {k: cfg[k] for k in ("dtype", "check_segments", "check_max_new_tokens", "prompt", "generation") if k in cfg}
            return self._run_export(recorded | {"input": str(self.artifacts / source), "data": self._check_data(cfg.get("data"))},
                                    base, out)
        return self._copy(self.build(source), out)  # a model directory re-saved in full precision

    def _run_export(self, recorded: dict[str, Any], base: Path, out: Path) -> Path:
        from stcompress.stages import export

        cfg = load_config(ExportConfig, recorded | {"base_model": str(base), "output": str(out), "device": self.device,
                                                    "quantize": "none", "scores": None})
        return export.run(cfg, progress=False)

    def _prune(self, name: str, m: dict[str, Any], out: Path) -> Path:
        from stcompress.stages import prune

        if m.get("encoder_layer_map"):
            raise ModelError(f"{name}: removes audio-encoder layers, which rebuild does not replay yet")
        cfg = m.get("config") or {}
        base = self.build(self.name_of(m.get("base_model") or cfg["model"]["path"]))
        recorded = {k: cfg[k] for k in ("check_segments", "check_max_new_tokens", "prompt", "generation") if k in cfg}
        pcfg = load_config(PruneConfig, recorded | {
            "layers": list(m["removed_layers"]), "output": str(out), "data": self._check_data(cfg.get("data")),
            "model": {"path": str(base), "dtype": "float32", "device": self.device}})
        return prune.run(pcfg, progress=False)

    def _projector(self, name: str, m: dict[str, Any], out: Path) -> Path:
        """A full fine-tune with the tower and the LM frozen changed only the projector: put it back."""
        from stcompress.model import arch
        from stcompress.model.load import load_model
        from stcompress.model.save import save_model

        train = (m.get("config") or {}).get("train") or {}
        if not (train.get("freeze_language_model") and train.get("freeze_audio_tower")):
            raise ModelError(f"{name}: a full fine-tune of the LM; its weights are not among the artifacts (only "
                             "frozen-LM warm-ups, which train the projector alone, can be rebuilt)")
        tensors = self._projector_tensors(name)
        root = m.get("base_model") or m["config"]["model"]["path"]
        while (below := self.name_of(root)) is not None:  # earlier warm-ups: superseded by this projector
            bm = self.manifest(below)
            if (bm.get("config") or {}).get("mode") != "full" or not ((bm.get("config") or {}).get("train") or {}).get("freeze_language_model"):
                break
            root = bm.get("base_model") or bm["config"]["model"]["path"]
        below = self.build(self.name_of(root))
        loaded = load_model(ModelConfig(path=str(below), dtype="float32", device=self.device))
        arch.projector(loaded.model).load_state_dict(tensors, strict=True)
        with staged_output(out) as tmp:
            save_model(loaded.model, loaded.processor, tmp)
            # a model directory (not a finetune output: no mode), as export and evaluate expect one
            manifest = build_manifest("rebuild", {"projector_of": name}, {"model": path_identity(below)}, {},
                                      base_model=str(below), target_lang=m.get("target_lang"), prompt=m.get("prompt"))
            write_manifest(tmp, manifest)
        return out

    def _projector_tensors(self, name: str) -> dict[str, Any]:
        from safetensors import safe_open

        for path in (self.artifacts / name / PROJECTOR, self.artifacts / PROJECTOR):
            if path.is_file():
                with safe_open(str(path), "pt") as f:
                    if (f.metadata() or {}).get("stage", name) == name:
                        return {k.split("multi_modal_projector.", 1)[1]: f.get_tensor(k) for k in f.keys()}
        raise ModelError(f"{name}: no {PROJECTOR} for it in {self.artifacts}; collect the artifacts again")

    def _copy(self, src: Path, out: Path) -> Path:
        with staged_output(out) as tmp:
            for f in src.iterdir():
                if f.is_file():
                    shutil.copy2(f, tmp / f.name)
        return out


def rebuild(base: Path, artifacts: Path, system: str, out: Path, *, check_data: str = CHECK_DATA, device: str = "cpu",
            known: dict[str, Path] | None = None) -> Path:
    """`system` (teacher, prune25, final25, ... or any model stage's name) -> a model directory at
    `out` that loads with plain from_pretrained, with Gemma's NOTICE; written whole or not at all.
    `known`: stages already rebuilt (name -> model directory), reused instead of rebuilt."""
    from stcompress.testbed.model import NOTICE

    if out.exists():
        raise ModelError(f"out: {out} already exists; remove it or choose another --out")
    name = stage_name(artifacts, system)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.rebuild-", dir=out.parent) as work:
        rebuilder = Rebuilder(base, artifacts, Path(work), check_data, device)
        rebuilder.done.update({k: v for k, v in (known or {}).items() if k != name})
        model = rebuilder.build(name)
        with staged_output(out) as tmp:
            for f in model.iterdir():
                os.replace(f, tmp / f.name)
            (tmp / "NOTICE").write_text(NOTICE)
            manifest = json.loads((tmp / MANIFEST).read_text(encoding="utf-8"))
            manifest.pop("files", None)
            manifest["model"] = dict(manifest.get("model") or {}, path=str(out.resolve()))
            manifest["rebuilt"] = {"system": system, "stage": name, "artifacts": str(artifacts.resolve()),
                                   "base": str(base.resolve()), "recorded": read_manifest(artifacts / name).get("model")}
            write_manifest(tmp, manifest)
    log.info("rebuilt %s (%s) -> %s", system, name, out)
    return out


SEEDED = "seeded.json"  # in the run directory: which stages came from artifacts, and which were rebuilt


def seed(base: Path, artifacts: Path, run_dir: Path, stages: list[str], *, check_data: str = CHECK_DATA,
         device: str = "cpu") -> list[str]:
    """Finished stages of an earlier run, from its collected artifacts, into `run_dir`, so that
    `stcompress run` on the same recipe skips them and continues where that run stopped.

    Each stage's collected files go in unchanged, its manifest byte for byte (the runner's plan.json
    record holds that manifest's hash); the run's plan.json too, when `run_dir` has none. What the
    manifest lists but was not collected comes back (`Rebuilder.missing_files`): the weights of a
    merged or pruned model rebuilt from the base and the adapters, as `rebuild` does (within the fp16
    rounding of the adapters, not bit-identical: a stage that fingerprints its input model, such as
    an unfinished importance search, starts afresh rather than resume), an adapter's processor files
    from its base, KD data that was too large to collect translated again by the rebuilt teacher.
    `seeded.json` records what was rebuilt (for KD data, its counts against the recorded ones). A
    stage already in `run_dir` is left alone. `stages` ["all"]: every stage plan.json records as
    done whose files were collected.
    Returns the stages seeded.
    """
    plan = artifacts / "plan.json"
    if not plan.is_file():
        raise ModelError(f"artifacts: {artifacts} has no plan.json; collect the run again (collect_artifacts keeps it)")
    if stages == ["all"]:  # every finished stage, in the run's order
        recorded = json.loads(plan.read_text(encoding="utf-8")).get("stages", {})
        stages = [n for n, r in recorded.items() if r.get("status") == "done" and (artifacts / n / MANIFEST).is_file()]
    for name in stages:
        if not (artifacts / name / MANIFEST).is_file():
            raise ModelError(f"stages: {name} is not a finished stage in {artifacts} (no {MANIFEST}); "
                             f"seed only finished stages, e.g. {', '.join(sorted(_finished(artifacts))[:6])}")
    if not (base / "config.json").is_file():
        raise ModelError(f"base: {base} is not a model directory; build it with python -m stcompress.testbed build-model")
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / "plan.json").is_file():
        shutil.copy2(plan, run_dir / "plan.json")
    record_path = run_dir / SEEDED
    record = json.loads(record_path.read_text(encoding="utf-8")) if record_path.is_file() else {"stages": {}}
    done = []
    with tempfile.TemporaryDirectory(prefix=".seed-", dir=run_dir) as work:
        rebuilder = Rebuilder(base, artifacts, Path(work), check_data, device)
        for name in stages:
            target = run_dir / name
            if target.exists():
                log.info("seed: %s already in %s; left as it is", name, run_dir)
                continue
            src = artifacts / name
            listed = read_manifest(src).get("files") or []
            missing = [f for f in listed if not (src / f).exists()]
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}.seed-", dir=run_dir))
            try:
                shutil.copytree(src, tmp, dirs_exist_ok=True)
                for f, have in rebuilder.missing_files(name, missing):
                    shutil.copy2(have, tmp / f)
                if (tmp / MANIFEST).read_bytes() != (src / MANIFEST).read_bytes():
                    raise ModelError(f"{name}: its manifest changed while seeding")
                os.replace(tmp, target)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            record["stages"][name] = {"artifacts": str(artifacts.resolve()), "rebuilt": missing,
                                      "base": str(base.resolve()) if missing else None, **rebuilder.notes.get(name, {})}
            atomic_write_json(record_path, record)
            log.info("seeded %s%s", name, f" (rebuilt {', '.join(missing)})" if missing else "")
            done.append(name)
    return done


def _finished(artifacts: Path) -> list[str]:
    return [d.name for d in artifacts.iterdir() if (d / MANIFEST).is_file()] if artifacts.is_dir() else []
