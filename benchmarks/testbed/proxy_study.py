"""Cheap proxies vs the real metric, from a finished importance search (issue 10, point 3).

    PYTHONPATH=src python benchmarks/testbed/proxy_study.py RUN_DIR --out proxy-study.md [--data DEV.jsonl]

RUN_DIR is an importance output, or a run directory holding `importance/`. Writes FILE.md and
FILE.json: per round, the Spearman correlation of every logged proxy with the generation metric
over that round's candidates; then what a proxy-prefiltered search (prefilter_keep 2, 3, 4) and a
successive-halving search would have removed, replayed by the product's own search on the logged
scores (stcompress.importance.replay), with its cost against the full search's. Halving rescores
prefixes of the dev set from the logged hypotheses and needs the dev references: the data the
search ran on (its manifest's `data`), or --data MANIFEST when that path is elsewhere here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from stcompress.artifacts import atomic_write_text
from stcompress.errors import StcompressError
from stcompress.importance.replay import LoggedSearch, full_cost, load_search, round_correlations, standard_strategies

ABSENT = ("angular_distance",)  # proxies the issue names that this search did not log


def importance_dir(path: Path) -> Path:
    return path if (path / "removal_order.json").is_file() else path / "importance"


def references(log: LoggedSearch, data: Path | None) -> dict[str, list[str]] | None:
    """Dev references by segment id, from --data or the data the search recorded; None if unreadable."""
    from stcompress.config import DataConfig, load_config
    from stcompress.data.sources import load_examples

    recorded = json.loads((log.directory / "manifest.json").read_text(encoding="utf-8"))["config"]["data"]
    fields = {f.name for f in dataclasses.fields(DataConfig)}
    cfg = load_config(DataConfig, {k: v for k, v in recorded.items() if k in fields}, check=False)
    if data is not None:
        cfg = dataclasses.replace(cfg, dataset=str(data))
    try:
        examples = load_examples(cfg, on_error="fail", require_references=True).examples
    except StcompressError as exc:
        print(f"note: no dev references ({exc}); halving is not replayed", file=sys.stderr)
        return None
    return {ex.id: list(ex.references) for ex in examples}


def pruned_from(run_dir: Path) -> dict[str, int]:
    """Prune stages of the run that cut the search's order: name -> how many of it they removed."""
    out = {}
    for d in sorted(run_dir.iterdir()) if (run_dir / "importance").is_dir() else []:
        try:
            m = json.loads((d / "manifest.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if m.get("stage") == "prune" and (m.get("config") or {}).get("importance"):
            out[d.name] = len(m.get("removed_layers") or [])
    return out


def study(run_dir: Path, data: Path | None = None, keeps: tuple[int, ...] = (2, 3, 4, 8)) -> dict[str, Any]:
    log = load_search(importance_dir(run_dir))
    log.references = references(log, data)
    strategies, skipped = standard_strategies(log, keeps)
    rounds = len(log.removal_order)
    prunes = pruned_from(run_dir)
    return {
        "importance": str(log.directory), "metric": log.metric, "dev_segments": log.total_segments,
        "removal_order": log.removal_order, "logged_approximations": log.approximations,
        "proxies_logged": sorted({n for by in log.proxies.values() for n in by}),
        "proxies_absent": [p for p in ABSENT if all(p not in by for by in log.proxies.values())],
        "proxy_seconds_logged": bool(log.proxy_seconds),
        "correlation": {str(r): v for r, v in round_correlations(log).items()},
        "full_search": full_cost(log) | {"rounds": rounds},
        "not_replayed": skipped,
        "strategies": [s.to_dict() | {"full_over_same_rounds": full_cost(log, s.diverged_at or rounds),
                                      "same_models": [n for n, k in prunes.items() if s.same_prefix >= k]} for s in strategies],
    }


def _f(x: float | None, fmt: str = "{:.3f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def markdown(res: dict[str, Any]) -> str:
    full = res["full_search"]
    lines = [
        f"# Proxy study: {res['importance']}", "",
        f"Selection metric {res['metric']}, {res['dev_segments']} dev segments; full search: removal order "
        f"{res['removal_order']}, {full['evaluations']} candidate decodes, {full['seconds']:.1f} s of decoding "
        f"(logged per candidate). Proxies logged: {', '.join(res['proxies_logged']) or 'none'}"
        + (f"; not logged: {', '.join(res['proxies_absent'])}" if res["proxies_absent"] else "") + ".",
        "Every value is oriented 'higher = better to remove' (as the prefilter ranks); a proxy that ranks candidates "
        "like the metric has Spearman +1. Winner rank: where the metric's winner sits in the proxy's order (the "
        "smallest prefilter_keep that keeps it).", "",
        "| round | proxy | candidates | Spearman | winner rank | proxy top-1 = winner |", "|---|---|---|---|---|---|",
    ]
    for r, by in res["correlation"].items():
        for name, c in by.items():
            lines.append(f"| {r} | {name} | {c['candidates']} | {_f(c['spearman'])} | {c['winner_rank']} | "
                         f"{'yes' if c['top1_is_winner'] else 'no'} |")
    lines += ["", "Cheaper searches replayed on the logged scores (the product's GreedySearch, an evaluator that "
              "answers from the log). Cost over the rounds replayed, against the full search over the same rounds; "
              "seconds estimated from the logged per-candidate times (halving: scaled by the fraction of the dev set)."
              + ("" if res["proxy_seconds_logged"] else " The proxies' own cost was not logged by this search "
                 "(proxies.json 'seconds', logged since this study)."), "",
              "| strategy | importance options | removal order | same as full | same pruned models | decodes (full) | decode s (full) | proxy s | total s (full) | note |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for s in res["strategies"]:
        opts = ", ".join(f"{k}: {json.dumps(v)}" for k, v in s["config"].items())
        same = "yes" if s["same_as_full"] else f"first {s['same_prefix']}; diverged at round {s['diverged_at']}"
        base = s["full_over_same_rounds"]
        total = "n/a" if s["config"].get("prefilter") and s["proxy_seconds"] is None else f"{s['seconds'] + (s['proxy_seconds'] or 0):.1f}"
        lines.append(f"| {s['name']} | `{opts}` | {s['removal_order']} | {same} | {', '.join(s['same_models']) or '-'} | {s['segment_equivalents']:g} "
                     f"({base['evaluations']}) | {s['seconds']:.1f} ({base['seconds']:.1f}) | {_f(s['proxy_seconds'], '{:.1f}')} "
                     f"| {total} ({base['seconds']:.1f}) | {s['note']} |")
    lines += [f"| {n.split(':')[0]} | | | not replayed: {n.split(':', 1)[1].strip()} | | | | | | |" for n in res["not_replayed"]]
    lines += ["", "Decodes count whole-dev-set equivalents (a halving rung on a third of the dev set counts 1/3). A strategy "
              "that diverged is exact up to its divergence: later rounds would need decodes nobody logged; its "
              "models agree with the full search's for the first N removals shown ('first N'). Same pruned models: the run's "
              "prune stages that cut no more of the order than the replay reproduces (their test scores are the cheap "
              "search's too)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--out", type=Path, required=True, help="FILE.md (FILE.json is written beside it)")
    ap.add_argument("--data", type=Path, default=None, help="the dev manifest the search ran on (for halving)")
    ap.add_argument("--keep", default="2,3,4,8", help="prefilter_keep values to replay")
    args = ap.parse_args(argv)
    try:
        res = study(args.run_dir, args.data, tuple(int(k) for k in args.keep.split(",")))
    except StcompressError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out_md = args.out.with_suffix(".md")
    out_md.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_md.with_suffix(".json"), json.dumps(res, indent=2) + "\n")
    atomic_write_text(out_md, markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
