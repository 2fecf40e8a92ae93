"""`stcompress distill`: sequence-level knowledge-distillation data (PAPER.md step 3).

The teacher translates the training set with the batched engine (greedy, as in the paper); the
output set is every example's reference plus the teacher's translation, with exact duplicates
(same example, same text after whitespace normalisation) removed: 784 segments became 1,568
(de) and 1,069 (zh) examples in the paper. Beyond the paper, and off by default: a quality filter
on teacher outputs (sentence chrF against the reference, the analogue of distil-whisper's WER
filter), an upsampling factor, and teacher-only output.

Output: examples.jsonl (the KD set, one row {"id", "source_id", "target", "origin"} per training
target; ids are "<source_id>:ref", ":ref1" for further references, ":kd", ":kd1" ... for upsampled
copies; teacher rows carry their filter "score" when the filter is on;
`stcompress.data.distilled.load_distilled` reads it back with audio), hypotheses.jsonl (the
teacher's raw outputs, as `stcompress translate` writes them), skipped.jsonl when items were
skipped, and manifest.json (config, whose `data` section reloads the audio, counts, teacher model,
prompt). A finetune output can be the teacher (its model/ directory is used).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stcompress.artifacts import MANIFEST, atomic_write_json, build_manifest, path_identity, staged_output, write_jsonl
from stcompress.config import DistillConfig, to_dict
from stcompress.data.sources import load_examples
from stcompress.errors import ConfigError, DataError
from stcompress.metrics.text import check_scorer, sentence_scores
from stcompress.model.load import load_model
from stcompress.outputs import claims_output
from stcompress.stages.translate import HYPOTHESES, SKIPPED, data_identity, hypothesis_row, model_info, skipped_rows
from stcompress.translate import RunStats, Translator

log = logging.getLogger(__name__)

EXAMPLES = "examples.jsonl"
ORIGINS = ("reference", "teacher")


def normalize(text: str) -> str:
    """What "exact duplicate" compares: the text with runs of whitespace collapsed, ends stripped."""
    return " ".join(text.split())


def _teacher_scores(rows: Sequence[dict[str, Any]], cfg: DistillConfig) -> list[float | None]:
    """Sentence score of each teacher output against its references (None where unscored)."""
    if cfg.min_score is None:
        return [None] * len(rows)
    todo = [i for i, r in enumerate(rows) if r["hypothesis"].strip() and r["references"]]
    scores: list[float | None] = [None] * len(rows)
    if todo:
        lang = rows[todo[0]]["target_lang"]
        values = sentence_scores(
            cfg.filter_metric, [rows[i]["hypothesis"] for i in todo], [rows[i]["references"] for i in todo], lang
        )
        for i, value in zip(todo, values):
            scores[i] = round(value, 4)
    return scores


def kd_rows(rows: Sequence[dict[str, Any]], cfg: DistillConfig) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Hypothesis rows (id, hypothesis, references, target_lang) -> KD examples and their counts.

    Per example, in data order: its distinct references (unless teacher_only), then the teacher's
    output `upsample` times, unless it is empty, duplicates a reference (not counted with
    teacher_only: there is nothing to duplicate) or scores below min_score.
    """
    scores = _teacher_scores(rows, cfg)
    out: list[dict[str, Any]] = []
    counts = dict.fromkeys(("examples", "references", "teacher", "empty", "duplicates", "filtered", "teacher_kept"), 0)
    for row, score in zip(rows, scores):
        counts["examples"] += 1
        counts["teacher"] += 1
        seen = set()
        for ref in row["references"]:
            if normalize(ref) in seen:
                continue
            seen.add(normalize(ref))
            if not cfg.teacher_only:
                out.append(_row(row["id"], len(seen) - 1, "reference", ref))
                counts["references"] += 1
        hyp = row["hypothesis"].strip()
        if not hyp:
            counts["empty"] += 1
            continue
        if not cfg.teacher_only and normalize(hyp) in seen:
            counts["duplicates"] += 1
            continue
        if score is not None and score < cfg.min_score:  # type: ignore[operator]
            counts["filtered"] += 1
            continue
        counts["teacher_kept"] += 1
        out.extend(_row(row["id"], k, "teacher", hyp, score) for k in range(cfg.upsample))
    counts["rows"] = len(out)
    return out, counts


def _row(source_id: str, k: int, origin: str, target: str, score: float | None = None) -> dict[str, Any]:
    tag = "ref" if origin == "reference" else "kd"
    row = {"id": f"{source_id}:{tag}{k or ''}", "source_id": source_id, "target": target.strip(), "origin": origin}
    if score is not None:
        row["score"] = score
    return row


def _check_unique(rows: Sequence[dict[str, Any]]) -> None:
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):  # only reachable with ids that embed our own suffixes
        raise DataError("distill: example ids collide with the KD row-id suffixes (':ref', ':kd'); rename the ids")


def resolve_teacher(cfg: DistillConfig) -> DistillConfig:
    """Accept a finetune output as the teacher (its model/ directory), and warn when the prompt
    differs from the one the teacher was trained with (training prompt = inference prompt)."""
    from stcompress.stages.finetune import resolve_base

    path, lineage = resolve_base(cfg.model.path)
    trained = lineage.get("upstream_prompt_config")
    if trained and trained != dataclasses.asdict(cfg.prompt):
        log.warning("prompt: differs from the one the teacher %s was trained with (%s); pass the same prompt", path, trained)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=path)) if path != cfg.model.path else cfg


@claims_output()
def run(cfg: DistillConfig, *, progress: bool = True) -> Path:
    if problems := cfg.problems():
        raise ConfigError(problems)
    if cfg.min_score is not None:
        check_scorer(cfg.data.target_lang, [cfg.filter_metric])
    teacher_cfg = resolve_teacher(cfg).model
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    needs_refs = not cfg.teacher_only or cfg.min_score is not None
    data = load_examples(cfg.data, on_error=cfg.on_error, require_references=needs_refs)
    timings["load_data"] = time.perf_counter() - t0
    if not data.examples:
        raise DataError(f"data.dataset: {cfg.data.dataset} has no examples left to distil; check the split, subset and limit")
    t0 = time.perf_counter()
    teacher = load_model(teacher_cfg)
    timings["load_model"] = time.perf_counter() - t0
    translator = Translator(teacher.model, teacher.processor, cfg.prompt, cfg.generation, progress=progress)
    stats = RunStats()
    hyps = translator.translate(data.examples, stats=stats)
    timings["translate"] = stats.seconds
    hyp_rows = [hypothesis_row(ex, h) for ex, h in zip(data.examples, hyps)]
    rows, counts = kd_rows(hyp_rows, cfg)
    _check_unique(rows)
    counts.update(upsample=cfg.upsample, skipped=len(data.skipped))
    skipped = skipped_rows(data)
    manifest = build_manifest(
        "distill", to_dict(cfg), {"model": path_identity(teacher.path), "data": data_identity(cfg.data)}, timings,
        model=model_info(teacher), prompt=translator.prompt.render(cfg.data.target_lang),
        speed=stats.to_dict(), counts=counts, skipped=[s["id"] for s in skipped],
    )
    with staged_output(cfg.output) as out:
        write_jsonl(out / EXAMPLES, rows)
        write_jsonl(out / HYPOTHESES, hyp_rows)
        if skipped:
            write_jsonl(out / SKIPPED, skipped)
        atomic_write_json(out / MANIFEST, manifest)
    log.info(
        "distill: %d examples -> %d rows (%d references + %d teacher outputs kept x%d; %d duplicates, %d filtered, "
        "%d empty, %d skipped) -> %s", counts["examples"], counts["rows"], counts["references"], counts["teacher_kept"],
        cfg.upsample, counts["duplicates"], counts["filtered"], counts["empty"], counts["skipped"], cfg.output,
    )
    return Path(cfg.output)
