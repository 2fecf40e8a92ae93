"""`stcompress translate`: a model and a dataset in, hypotheses.jsonl + manifest.json out."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stcompress.artifacts import MANIFEST, atomic_write_json, build_manifest, path_identity, staged_output, write_jsonl
from stcompress.config import DataConfig, TranslateConfig, to_dict
from stcompress.data.example import Example, LoadResult
from stcompress.data.sources import builtin_manifest_path, load_examples
from stcompress.errors import DataError
from stcompress.metrics.efficiency import count_parameters, weight_bytes
from stcompress.model import arch
from stcompress.model.load import LoadedModel, load_model
from stcompress.outputs import claims_output
from stcompress.translate import Hypothesis, RunStats, Translator

log = logging.getLogger(__name__)

HYPOTHESES = "hypotheses.jsonl"
SKIPPED = "skipped.jsonl"


@dataclass
class Translation:
    """What a translation pass produced, before anything is written."""

    rows: list[dict[str, Any]]
    skipped: list[dict[str, str]]
    stats: RunStats
    model_info: dict[str, Any]
    prompt_text: str
    inputs: dict[str, Any]
    timings: dict[str, float]


def data_identity(cfg: DataConfig) -> dict[str, Any]:
    if cfg.dataset.startswith("builtin") or cfg.format == "builtin":
        return path_identity(builtin_manifest_path(cfg.dataset if cfg.dataset.startswith("builtin") else "builtin").parent)
    if Path(cfg.dataset).exists():
        return path_identity(cfg.dataset)
    return {"name": cfg.dataset, "hf_config": cfg.hf_config, "split": cfg.split}


def model_info(loaded: LoadedModel) -> dict[str, Any]:
    info: dict[str, Any] = {
        "path": loaded.path,
        "decoder_layers": arch.num_decoder_layers(loaded.model),
        "parameters": count_parameters(loaded.model),
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "device": str(loaded.device),
    }
    if Path(loaded.path).is_dir():
        info["bytes_on_disk"] = weight_bytes(loaded.path)
    return info


def hypothesis_row(ex: Example, hyp: Hypothesis) -> dict[str, Any]:
    return {
        "id": ex.id,
        "hypothesis": hyp.text,
        "references": list(ex.references),
        "source": ex.source,
        "target_lang": ex.target_lang,
        "n_tokens": hyp.n_tokens,
        "audio_seconds": round(ex.duration, 3),
    }


def skipped_rows(data: LoadResult) -> list[dict[str, str]]:
    return [{"id": s.id, "reason": s.reason} for s in data.skipped]


def translate_dataset(cfg: TranslateConfig, *, progress: bool = True, require_references: bool = False) -> Translation:
    """`require_references` (evaluate): a missing reference column fails here, before the model loads."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    data = load_examples(cfg.data, on_error=cfg.on_error, require_references=require_references)
    timings["load_data"] = time.perf_counter() - t0
    if not data.examples:
        raise DataError(f"data.dataset: {cfg.data.dataset} has no examples left to translate; check the split, subset and limit")
    t0 = time.perf_counter()
    loaded = load_model(cfg.model)
    timings["load_model"] = time.perf_counter() - t0
    # Timed end to end (segments/s in reports), so the audio tower always runs: no memo hits.
    translator = Translator(loaded.model, loaded.processor, cfg.prompt, cfg.generation, progress=progress,
                            remember_audio=False)
    stats = RunStats()
    hyps = translator.translate(data.examples, stats=stats)
    timings["translate"] = stats.seconds
    prompt_text = translator.prompt.render(cfg.data.target_lang)
    return Translation(
        rows=[hypothesis_row(ex, h) for ex, h in zip(data.examples, hyps)],
        skipped=skipped_rows(data),
        stats=stats,
        model_info=model_info(loaded),
        prompt_text=prompt_text,
        inputs={"model": path_identity(loaded.path), "data": data_identity(cfg.data)},
        timings=timings,
    )


def write_translation(out: Path, stage: str, config: dict[str, Any], result: Translation, **extra: Any) -> None:
    write_jsonl(out / HYPOTHESES, result.rows)
    if result.skipped:
        write_jsonl(out / SKIPPED, result.skipped)
    manifest = build_manifest(
        stage,
        config,
        result.inputs,
        result.timings,
        model=result.model_info,
        prompt=result.prompt_text,
        speed=result.stats.to_dict(),
        counts={"translated": len(result.rows), "skipped": len(result.skipped)},
        skipped=[s["id"] for s in result.skipped],
        **extra,
    )
    atomic_write_json(out / MANIFEST, manifest)


@claims_output()
def run(cfg: TranslateConfig, *, progress: bool = True) -> Path:
    result = translate_dataset(cfg, progress=progress)
    with staged_output(cfg.output) as out:
        write_translation(out, "translate", to_dict(cfg), result)
    log.info("translated %d segments (%d skipped) -> %s", len(result.rows), len(result.skipped), cfg.output)
    return Path(cfg.output)
