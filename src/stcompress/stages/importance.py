"""`stcompress importance`: the paper's greedy layer-importance search, resumable and multi-GPU.

The output directory fills as the search runs (the state is what makes it resumable);
`manifest.json` is written last and marks it complete. Rerunning the same command continues an
unfinished search from the last finished candidate and ends with the same result. Launched with
`accelerate launch` or `torchrun`, each process takes every world-th candidate of a round.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from stcompress.artifacts import MANIFEST, atomic_write_json, build_manifest, content_identity, path_identity, write_jsonl
from stcompress.artifacts import removed_on_error, write_manifest
from stcompress.config import ImportanceConfig, to_dict
from stcompress.data.sources import load_examples
from stcompress.errors import DataError, StcompressError
from stcompress.importance.evaluator import GenerationEvaluator, check_metrics
from stcompress.importance.plots import heatmap
from stcompress.importance.search import GreedySearch, SearchResult, SearchSettings, candidate_layers
from stcompress.languages import default_selection_metric
from stcompress.metrics.comet import CometScorer
from stcompress.metrics.text import check_scorer
from stcompress.model.load import LoadedModel, load_model, resolve_model_path
from stcompress.outputs import claims_output
from stcompress.stages.translate import data_identity, model_info
from stcompress.translate import Translator

log = logging.getLogger(__name__)

SETTINGS = "search.json"
RESULT = "removal_order.json"
BASELINE = "baseline.json"
CANDIDATES = "candidates.jsonl"
# Everything the search writes into its output (it fills it in place; stcompress.outputs).
OWN = (SETTINGS, RESULT, BASELINE, CANDIDATES, "candidates.rank*.jsonl", "hypotheses", "heatmap.png", "proxies.json", MANIFEST)


def distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank) as set by accelerate launch / torchrun; (0, 1, 0) alone."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def selection_metric(cfg: ImportanceConfig) -> str:
    return cfg.metric or default_selection_metric(cfg.data.target_lang)


def _fingerprint(cfg: ImportanceConfig) -> dict[str, Any]:
    """What must match for an unfinished output to be resumed (not where it is written): the
    settings, and the content of the model and the data (the same path may hold other weights
    after an upstream stage reran)."""
    record = to_dict(cfg)
    for key in ("output", "wait_timeout", "restart"):
        record.pop(key)
    record["model"].pop("device")
    record["selection_metric"] = selection_metric(cfg)
    record["inputs"] = input_fingerprint(cfg)
    return record


def input_fingerprint(cfg: ImportanceConfig) -> dict[str, Any]:
    """Content hashes of the model and the data; paths left out (the config has them)."""
    return content_identity({"model": path_identity(resolve_model_path(cfg.model.path)), "data": data_identity(cfg.data)})


# Our own files: an output that holds only these is ours to resume or restart.
_STATE = (SETTINGS, RESULT, BASELINE, CANDIDATES, MANIFEST, "heatmap.png", "proxies.json", "hypotheses")


def _own_temp(p: Path) -> bool:
    """A temporary file of our atomic writes (`.NAME.XXXX.tmp`, `.heatmap.png.tmp.png`): a kill mid-write leaves one."""
    return p.is_file() and p.name.startswith(".") and p.name.endswith((".tmp", ".tmp.png"))


def _remove_temps(out: Path) -> None:
    for p in [*out.glob(".*"), *(out / "hypotheses").glob(".*")]:
        if _own_temp(p):
            p.unlink(missing_ok=True)


def _discard_state(out: Path) -> None:
    """--restart: remove this search's own files, nothing else."""
    import shutil

    for p in out.iterdir():
        if p.name in _STATE and p.is_dir():
            shutil.rmtree(p)
        elif p.name in _STATE or p.name.startswith("candidates.rank") or _own_temp(p):
            p.unlink()
    log.info("restart: discarded the earlier search state in %s", out)


def _prepare_output(cfg: ImportanceConfig, rank: int, world: int, current: dict[str, Any]) -> str:
    """'fresh', 'resume' or 'done'; refuses an output that holds a different search."""
    out = Path(cfg.output)
    settings = out / SETTINGS
    if rank == 0 and world == 1 and out.is_dir():  # several processes: another one may be mid-write
        _remove_temps(out)
    if not settings.is_file():
        foreign = [p for p in out.iterdir() if not p.name.startswith(("candidates.rank", "hypotheses")) and not _own_temp(p)] \
            if out.exists() else []
        if foreign and rank == 0:  # another process of this launch may already have written its state
            raise StcompressError(f"output: {out} exists and is not an importance search; choose a new --output")
        return "fresh"
    if cfg.restart:
        if rank == 0:
            _discard_state(out)
        return "fresh"
    try:
        previous = json.loads(settings.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise StcompressError(f"{settings}: corrupt; use a new --output, or --restart (restart: true) to start over") from None
    if previous != current:
        changed = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
        if changed == ["inputs"]:
            what = [k for k in ("model", "data") if previous["inputs"].get(k) != current["inputs"].get(k)] \
                if isinstance(previous.get("inputs"), dict) else ["model", "data"]
            raise StcompressError(
                f"output: {out} holds a search of other inputs (the content of the {' and '.join(what)} changed "
                "since it started); use a new --output, or --restart (restart: true) to discard that search and start over"
            )
        raise StcompressError(
            f"output: {out} holds a search with different settings ({', '.join(changed)}); "
            "use a new --output, or --restart (restart: true) to discard that search and start over"
        )
    return "done" if (out / MANIFEST).is_file() else "resume"


def _load(cfg: ImportanceConfig, local_rank: int, world: int) -> LoadedModel:
    model_cfg = cfg.model
    if world > 1 and model_cfg.device == "auto" and model_cfg.device_map is None:
        model_cfg = dataclasses.replace(model_cfg, device=f"cuda:{local_rank}")
    if model_cfg.device.startswith("cuda:") and torch.cuda.is_available():
        torch.cuda.set_device(torch.device(model_cfg.device))  # streams, graphs and caches follow
    return load_model(model_cfg)


def _settings(cfg: ImportanceConfig, n_layers: int, n_segments: int) -> SearchSettings:
    return SearchSettings(
        candidates=candidate_layers(n_layers, cfg.protect),
        n_layers=n_layers,
        metric=selection_metric(cfg),
        total_segments=n_segments,
        rounds=cfg.rounds,
        target_layers=cfg.target_layers,
        min_fraction=cfg.min_fraction,
        halving=cfg.halving,
        halving_eta=cfg.halving_eta,
        halving_min_segments=cfg.halving_min_segments,
        prefilter_keep=cfg.prefilter_keep if cfg.prefilter else None,
    )


def _write_results(out: Path, cfg: ImportanceConfig, search: GreedySearch, result: SearchResult, extra: dict[str, Any]) -> None:
    records = search.state.all_records()
    write_jsonl(out / CANDIDATES, [json.loads(r.to_json()) for r in records])
    atomic_write_json(out / BASELINE, {"scores": result.baseline.scores, "signatures": result.baseline.signatures})
    metric = search.s.metric
    kept = [i for i in range(search.s.n_layers) if i not in result.removal_order]
    atomic_write_json(out / RESULT, {
        "component": cfg.component,
        "metric": metric,
        "removal_order": result.removal_order,
        "removed_sorted": sorted(result.removal_order),
        "kept_layers": kept,
        "rounds": [{"round": w.round, "layer": w.layer, "scores": w.scores} for w in result.winners],
        "baseline": result.baseline.scores,
        "stop_reason": result.stop_reason,
        "approximations": extra["approximations"],
    })
    heatmap(records, metric, search.s.n_layers, result.removal_order, out / "heatmap.png",
            baseline=result.baseline.scores[metric])


def proxy_report(result: SearchResult, records: list, metric: str) -> dict[str, Any]:
    """Proxy values per round, and their Spearman rank correlation with the generation metric."""
    from scipy.stats import spearmanr

    full = {(r.round, r.layer): r.scores[metric] for r in records if r.layer is not None and not r.approximate}
    report: dict[str, Any] = {"rounds": {}, "correlation": {},
                              "seconds": {str(r): v for r, v in result.proxy_seconds.items()}}  # per round and proxy
    pooled: dict[str, tuple[list[float], list[float]]] = {}
    for round_, by_proxy in result.proxy_values.items():
        report["rounds"][str(round_)] = {name: {str(k): v for k, v in vals.items()} for name, vals in by_proxy.items()}
        for name, vals in by_proxy.items():
            pairs = [(v, full[(round_, layer)]) for layer, v in vals.items() if (round_, layer) in full]
            xs, ys = pooled.setdefault(name, ([], []))
            xs.extend(p[0] for p in pairs)
            ys.extend(p[1] for p in pairs)
    for name, (xs, ys) in pooled.items():
        rho = float(spearmanr(xs, ys).statistic) if len(xs) >= 3 and len(set(xs)) > 1 and len(set(ys)) > 1 else None
        report["correlation"][name] = {"spearman": rho, "pairs": len(xs), "metric": metric}
    return report


@claims_output(in_place=OWN)
def run(cfg: ImportanceConfig, *, progress: bool = True) -> Path:
    rank, world, local_rank = distributed()
    out = Path(cfg.output)
    fingerprint = _fingerprint(cfg)
    status = _prepare_output(cfg, rank, world, fingerprint)
    if status == "done":
        log.info("%s already holds this finished search; nothing to do", out)
        return out
    metrics = list(dict.fromkeys([*cfg.log_metrics, selection_metric(cfg)]))
    check_metrics(metrics)
    check_scorer(cfg.data.target_lang, metrics)
    t0 = time.perf_counter()
    data = load_examples(cfg.data, on_error="fail", require_references=True)
    if not data.examples:
        raise DataError(f"data.dataset: {cfg.data.dataset} gives an empty dev set; check data.subset, data.limit")
    loaded = _load(cfg, local_rank, world)
    translator = Translator(loaded.model, loaded.processor, cfg.prompt, cfg.generation, progress=progress and rank == 0)
    comet = CometScorer(cfg.comet.model or "Unbabel/wmt22-comet-da", batch_size=cfg.comet.batch_size) if "comet" in metrics else None
    evaluator = GenerationEvaluator(translator, data.examples, metrics, component=cfg.component, comet=comet)
    settings = _settings(cfg, evaluator.n_layers, len(data.examples))
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / SETTINGS, fingerprint)
    proxies = {}
    for name in dict.fromkeys([*cfg.proxies, *([cfg.prefilter] if cfg.prefilter else [])]):
        from stcompress.importance.proxies import make_prefilter

        proxies[name] = make_prefilter(name, translator, data.examples, component=cfg.component)
    search = GreedySearch(
        settings, evaluator, out, rank=rank, world=world, proxies=proxies, prefilter=cfg.prefilter, wait_timeout=cfg.wait_timeout
    )
    result = search.run()
    if comet is not None:
        comet.close()
    if rank != 0:
        return out
    approximations = [a for a, on in (("successive_halving", cfg.halving), (f"prefilter:{cfg.prefilter}", cfg.prefilter)) if on]
    extra = {"approximations": approximations}
    # A failure while writing the results (a full disk): no result file stays without its manifest.
    with removed_on_error(out / n for n in ("proxies.json", CANDIDATES, BASELINE, RESULT, "heatmap.png", MANIFEST)):
        if result.proxy_values:
            atomic_write_json(out / "proxies.json", proxy_report(result, search.state.all_records(), settings.metric))
        _write_results(out, cfg, search, result, extra)
        manifest = build_manifest(
            "importance", to_dict(cfg), {"model": path_identity(loaded.path), "data": data_identity(cfg.data)},
            {"total": time.perf_counter() - t0},
            model=model_info(loaded), removal_order=result.removal_order, metric=settings.metric, stop_reason=result.stop_reason,
            approximations=approximations, world_size=world, resumed=status == "resume",
            evaluations=len(search.state.records),
        )
        write_manifest(out, manifest)
    log.info("removal order %s (%s) -> %s", result.removal_order, result.stop_reason, out)
    return out
