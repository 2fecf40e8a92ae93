"""`stcompress evaluate`: hypotheses (existing, or translated now) + references -> scores.json.

Scores carry their sacrebleu signature; COMET (optional extra) uses the gold transcript as source.
Efficiency (true parameters, bytes on disk, speed) comes from the translation that produced the
hypotheses, so scoring an old hypotheses file never reloads the model.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from stcompress.artifacts import MANIFEST, atomic_write_json, build_manifest, path_identity, read_jsonl, staged_output
from stcompress.config import EvaluateConfig, TranslateConfig, to_dict
from stcompress.data.sources import load_examples
from stcompress.errors import DataError
from stcompress.metrics.comet import CometScorer
from stcompress.metrics.text import check_scorer, corpus_scores
from stcompress.outputs import claims_output
from stcompress.stages.translate import HYPOTHESES, translate_dataset, write_translation

log = logging.getLogger(__name__)

SCORES = "scores.json"


def _read_hypotheses(path: str) -> tuple[list[dict[str, Any]], dict[str, Any] | None, Path]:
    p = Path(path)
    file = p / HYPOTHESES if p.is_dir() else p
    if not file.is_file():
        raise DataError(f"hypotheses: {path} is not a hypotheses.jsonl file or a translate output directory; run stcompress translate first")
    rows = read_jsonl(file)
    for n, row in enumerate(rows, 1):
        if "id" not in row or "hypothesis" not in row:
            raise DataError(f"hypotheses: {file} line {n} lacks 'id' or 'hypothesis'; each line needs both")
    manifest_path = file.parent / MANIFEST
    manifest = None
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    return rows, manifest, file


def _attach_references(rows: list[dict[str, Any]], cfg: EvaluateConfig) -> None:
    """Rows without references get them from `data`, joined by id."""
    missing = [r for r in rows if not r.get("references")]
    if not missing:
        return
    data = load_examples(cfg.data, on_error="skip")
    by_id = {ex.id: ex for ex in data.examples}
    unknown = [r["id"] for r in missing if r["id"] not in by_id or not by_id[r["id"]].references]
    if unknown:
        shown = ", ".join(map(str, unknown[:5])) + (" ..." if len(unknown) > 5 else "")
        raise DataError(
            f"references: no reference translation for {len(unknown)} hypotheses ({shown}); "
            "point data.dataset / data.reference_column at a dataset with references for these ids"
        )
    for r in missing:
        ex = by_id[r["id"]]
        r["references"] = list(ex.references)
        r.setdefault("source", ex.source)
        r.setdefault("target_lang", ex.target_lang)


def _language(rows: list[dict[str, Any]], default: str) -> str:
    langs = {r.get("target_lang") or default for r in rows}
    if len(langs) != 1:
        raise DataError(f"hypotheses: mixed target languages {sorted(langs)}; evaluate one language at a time")
    return langs.pop()


def score_rows(rows: list[dict[str, Any]], cfg: EvaluateConfig, lang: str) -> dict[str, Any]:
    hyps = [r["hypothesis"] for r in rows]
    refs = [list(r["references"]) for r in rows]
    text_metrics = [m for m in cfg.metrics if m != "comet"]
    scores = {name: s.to_dict() for name, s in corpus_scores(text_metrics, hyps, refs, lang).items()}
    comet_model = cfg.comet.model or ("Unbabel/wmt22-comet-da" if "comet" in cfg.metrics else None)
    if comet_model:
        with CometScorer(comet_model, batch_size=cfg.comet.batch_size) as scorer:
            scores["comet"] = scorer.score([r.get("source") for r in rows], hyps, [r[0] for r in refs]).to_dict()
    return scores


@claims_output()
def run(cfg: EvaluateConfig, *, progress: bool = True) -> Path:
    t0 = time.perf_counter()
    translation = None
    if not cfg.hypotheses:
        check_scorer(cfg.data.target_lang, cfg.metrics)  # before the model translates anything
    if cfg.hypotheses:
        rows, source_manifest, file = _read_hypotheses(cfg.hypotheses)
        inputs = {"hypotheses": path_identity(file)}
    else:
        tcfg = TranslateConfig(
            output=cfg.output, on_error=cfg.on_error, model=cfg.model, data=cfg.data, prompt=cfg.prompt, generation=cfg.generation
        )
        translation = translate_dataset(tcfg, progress=progress, require_references=True)
        rows, source_manifest, inputs = translation.rows, None, translation.inputs
    if not rows:
        raise DataError("hypotheses: nothing to evaluate (0 segments); check the data selection")
    _attach_references(rows, cfg)
    lang = _language(rows, cfg.data.target_lang)
    check_scorer(lang, cfg.metrics, item="target_lang")
    t1 = time.perf_counter()
    scores = score_rows(rows, cfg, lang)
    timings = {"score": time.perf_counter() - t1, "total": time.perf_counter() - t0}
    model = translation.model_info if translation else (source_manifest or {}).get("model")
    speed = translation.stats.to_dict() if translation else (source_manifest or {}).get("speed")
    skipped = len(translation.skipped) if translation else ((source_manifest or {}).get("counts") or {}).get("skipped", 0)
    if skipped:
        log.warning("scored %d segments; %d were skipped (unreadable or incomplete, listed in skipped.jsonl) and are "
                    "not in these scores", len(rows), skipped)
    result = {"target_lang": lang, "segments": len(rows), "segments_scored": len(rows), "segments_skipped": skipped,
              "scores": scores, "model": model, "speed": speed}
    with staged_output(cfg.output) as out:
        if translation is not None:
            write_translation(out, "evaluate", to_dict(cfg), translation, scores=scores)
        else:
            atomic_write_json(out / MANIFEST, build_manifest("evaluate", to_dict(cfg), inputs, timings, scores=scores,
                                                             counts={"scored": len(rows), "skipped": skipped}))
        atomic_write_json(out / SCORES, result)
    return Path(cfg.output)


def format_table(result: dict[str, Any]) -> str:
    """A short plain-text table of scores.json for the terminal."""
    skipped = result.get("segments_skipped") or 0
    counted = f"{result['segments']} scored" + (f", {skipped} skipped (not in these scores)" if skipped else "")
    lines = [f"target language: {result['target_lang']}   segments: {counted}"]
    lines.append(f"{'metric':<8} {'score':>8}  signature")
    for name, s in result["scores"].items():
        lines.append(f"{name:<8} {s['score']:>8.2f}  {s['signature']}")
    model = result.get("model") or {}
    if model:
        size = model.get("bytes_on_disk")
        lines.append(
            f"model: {model.get('decoder_layers')} decoder layers, {model.get('parameters'):,} parameters"
            + (f", {size / 1e9:.3f} GB on disk" if size else "")
        )
    speed = result.get("speed") or {}
    if speed:
        lines.append(
            f"speed: {speed['segments_per_s']:.2f} segments/s, {speed['tokens_per_s']:.1f} tokens/s "
            f"({speed['seconds']:.1f} s)"
        )
    return "\n".join(lines)
