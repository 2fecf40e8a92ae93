"""Replay a finished greedy search: how well the cheap proxies rank candidates, and what a cheaper
search (proxy prefilter, successive halving) would have removed, from the logged scores alone.

The replay runs the product's own `GreedySearch` (same candidate rules, ties, halving rungs) on
an evaluator that answers from the logged records instead of decoding, so "what would
`prefilter: tf_loss, prefilter_keep: 3` have picked" is answered by the code that would run it.
It is exact only while the replayed search asks for variants the full search evaluated: once its
pick differs from the logged one, later rounds need scores nobody logged, and the replay stops
there ("diverged at round r"). Successive halving scores candidates on a prefix of the dev set;
the replay rescores the prefix from the logged hypotheses (the same hypotheses a prefix-only
decode gives, up to batch-padding numerics), which needs the dev references.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stcompress.errors import StcompressError
from stcompress.importance.search import GreedySearch, SearchSettings
from stcompress.importance.state import Record


class Diverged(Exception):
    """The replayed search needs a variant the logged search never scored: its own removals so far
    (`removed`) left the logged path, or (`reason` set) the logged search skipped a candidate."""

    def __init__(self, removed: Sequence[int], reason: str = ""):
        super().__init__(reason or f"left the logged path after removing {list(removed)}")
        self.removed, self.reason = list(removed), reason


@dataclass
class LoggedSearch:
    """What a finished importance output holds (candidates.jsonl, removal_order.json, proxies.json)."""

    metric: str
    lang: str
    n_layers: int
    candidates: tuple[int, ...]
    total_segments: int
    removal_order: list[int]
    records: dict[tuple[tuple[int, ...], int | None], Record]  # (removed before, layer) -> full-dev record
    proxies: dict[int, dict[str, dict[int, float]]]  # round -> proxy -> layer -> value (higher = removable)
    proxy_seconds: dict[int, dict[str, float]] = field(default_factory=dict)
    directory: Path | None = None
    references: dict[str, list[str]] | None = None  # dev segment id -> references (halving replay)
    approximations: list[str] = field(default_factory=list)


def load_search(directory: str | Path) -> LoggedSearch:
    d = Path(directory)
    missing = [n for n in ("removal_order.json", "manifest.json") if not (d / n).is_file()]
    if missing or not ((d / "candidates.jsonl").is_file() or list(d.glob("candidates.rank*.jsonl"))):
        raise StcompressError(f"{d}: not a finished importance output (missing {', '.join(missing) or 'candidates.jsonl'}); "
                              "point at the importance stage's directory")
    manifest = json.loads((d / "manifest.json").read_text(encoding="utf-8"))
    result = json.loads((d / "removal_order.json").read_text(encoding="utf-8"))
    rows = _candidate_rows(d)
    records = {}
    for row in rows:
        row.pop("sha256", None)
        rec = Record.from_dict(row)
        if not rec.approximate:
            records[(rec.removed, rec.layer)] = rec
    baseline = records.get(((), None))
    if baseline is None:
        raise StcompressError(f"{d}: the candidates hold no unpruned baseline; the search did not finish")
    n_layers = len(result["kept_layers"]) + len(result["removal_order"])
    cfg = manifest.get("config", {})
    protect = cfg.get("protect")
    protect = (0, n_layers - 1) if protect is None else tuple(protect)
    proxies, seconds = _proxies(d)
    return LoggedSearch(
        metric=result["metric"], lang=(cfg.get("data") or {}).get("target_lang") or "de", n_layers=n_layers,
        candidates=tuple(i for i in range(n_layers) if i not in protect), total_segments=baseline.segments,
        removal_order=list(result["removal_order"]), records=records, proxies=proxies, proxy_seconds=seconds,
        directory=d, approximations=list(result.get("approximations") or []),
    )


def _candidate_rows(d: Path) -> list[dict[str, Any]]:
    files = [d / "candidates.jsonl"] if (d / "candidates.jsonl").is_file() else sorted(d.glob("candidates.rank*.jsonl"))
    return [json.loads(line) for f in files for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]


def _proxies(d: Path) -> tuple[dict[int, dict[str, dict[int, float]]], dict[int, dict[str, float]]]:
    path = d / "proxies.json"
    if not path.is_file():
        return {}, {}
    data = json.loads(path.read_text(encoding="utf-8"))
    values = {int(r): {name: {int(k): float(v) for k, v in vals.items()} for name, vals in by.items()}
              for r, by in data.get("rounds", {}).items()}
    seconds = {int(r): {name: float(s) for name, s in by.items()} for r, by in (data.get("seconds") or {}).items()}
    return values, seconds


# ---------------------------------------------------------------------------------------------
# Rank correlation per round


def round_correlations(log: LoggedSearch) -> dict[int, dict[str, dict[str, Any]]]:
    """Per round and proxy: Spearman of the proxy with the generation metric over the round's
    candidates (both 'higher = better to remove'), the metric winner's rank under the proxy (the
    smallest prefilter_keep that keeps it), and whether the proxy's top pick is the winner."""
    from scipy.stats import spearmanr

    out: dict[int, dict[str, dict[str, Any]]] = {}
    for round_, by_proxy in sorted(log.proxies.items()):
        if round_ > len(log.removal_order):
            continue
        removed = tuple(log.removal_order[: round_ - 1])
        winner = log.removal_order[round_ - 1]
        for name, values in by_proxy.items():
            layers = [l for l in sorted(values) if (removed, l) in log.records]
            xs = [values[l] for l in layers]
            ys = [log.records[(removed, l)].scores[log.metric] for l in layers]
            rho = float(spearmanr(xs, ys).statistic) if len(xs) >= 3 and len(set(xs)) > 1 and len(set(ys)) > 1 else None
            by_rank = sorted(layers, key=lambda l: (-values[l], l))  # the prefilter's order
            out.setdefault(round_, {})[name] = {
                "spearman": rho, "candidates": len(layers),
                "winner_rank": by_rank.index(winner) + 1 if winner in by_rank else None,
                "top1_is_winner": bool(by_rank) and by_rank[0] == winner,
            }
    return out


# ---------------------------------------------------------------------------------------------
# Replaying a cheaper search


class ReplayEvaluator:
    """Answers `evaluate(removed, n)` from the logged search; counts what a real run would decode."""

    def __init__(self, log: LoggedSearch):
        self.log = log
        self.calls: list[tuple[tuple[int, ...], int, float]] = []  # (variant, segments, estimated seconds)
        self._hyps: dict[str, list[dict[str, Any]]] = {}

    def evaluate(self, removed: Sequence[int], n_segments: int) -> tuple[dict[str, float], dict[str, str], list[dict[str, Any]]]:
        variant = tuple(removed)
        key = (variant[:-1], variant[-1]) if variant else ((), None)
        rec = self.log.records.get(key)
        if rec is None:
            prefix = list(key[0])
            if prefix != self.log.removal_order[: len(prefix)]:
                raise Diverged(prefix)
            raise Diverged(prefix, f"round {len(prefix) + 1}: layer {key[1]} was not scored on the whole dev set by the "
                                   "logged search (it was approximate itself)")
        self.calls.append((variant, n_segments, rec.seconds * n_segments / rec.segments))
        if n_segments >= rec.segments:
            return dict(rec.scores), dict(rec.signatures), []
        return self._prefix_scores(rec, n_segments), {}, []

    def _prefix_scores(self, rec: Record, n: int) -> dict[str, float]:
        from stcompress.metrics.text import corpus_scores

        refs = self.log.references
        if refs is None or self.log.directory is None:
            raise StcompressError("halving replay: needs the dev references (--data MANIFEST or the importance data) "
                                  "to rescore a prefix of the dev set")
        rows = self._hyps.get(rec.hypotheses)
        if rows is None:
            path = self.log.directory / "hypotheses" / rec.hypotheses
            if not path.is_file():
                raise StcompressError(f"halving replay: {path} is missing; replay from the full importance output")
            rows = self._hyps[rec.hypotheses] = [json.loads(l) for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]
        head = rows[:n]
        missing = [r["id"] for r in head if r["id"] not in refs]
        if missing:
            raise StcompressError(f"halving replay: dev segment {missing[0]!r} has no reference in the data given; "
                                  "pass the dev manifest the search ran on")
        return {k: s.score for k, s in corpus_scores([self.log.metric], [r["hypothesis"] for r in head],
                                                       [refs[r["id"]] for r in head], self.log.lang).items()}


@dataclass
class Replay:
    name: str
    config: dict[str, Any]  # the importance options that run this strategy for real
    removal_order: list[int]  # as far as the replay got
    same_as_full: bool
    same_prefix: int  # how many of the full search's removals it reproduces, in order
    diverged_at: int | None
    note: str
    evaluations: int  # candidate decodes (any prefix of the dev set), baseline excluded
    segment_equivalents: float  # candidate decodes weighted by the fraction of the dev set decoded
    seconds: float  # estimated from the logged per-candidate seconds (decodes only)
    proxy_seconds: float | None  # logged cost of the proxies over the replayed rounds; None: not logged

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def full_cost(log: LoggedSearch, rounds: int | None = None) -> dict[str, float]:
    """Decodes and seconds of the full search over its first `rounds` rounds (baseline excluded)."""
    rounds = len(log.removal_order) if rounds is None else rounds
    recs = [r for (removed, layer), r in log.records.items()
            if layer is not None and len(removed) < rounds and tuple(log.removal_order[: len(removed)]) == removed]
    return {"evaluations": len(recs), "seconds": round(sum(r.seconds for r in recs), 3)}


def replay(log: LoggedSearch, name: str, *, prefilter: str | None = None, keep: int | None = None,
           halving: bool = False, eta: int = 3, min_segments: int = 10) -> Replay:
    config: dict[str, Any] = {}
    if prefilter:
        if not log.proxies or any(prefilter not in log.proxies.get(r, {}) for r in range(1, len(log.removal_order) + 1)):
            raise StcompressError(f"replay: proxy {prefilter!r} is not logged for every round; run importance with proxies: [{prefilter}]")
        config.update(prefilter=prefilter, prefilter_keep=keep)
    if halving:
        config.update(halving=True, halving_eta=eta, halving_min_segments=min_segments)
    settings = SearchSettings(candidates=log.candidates, n_layers=log.n_layers, metric=log.metric,
                              total_segments=log.total_segments, rounds=len(log.removal_order), halving=halving,
                              halving_eta=eta, halving_min_segments=min_segments, prefilter_keep=keep if prefilter else None)
    evaluator = ReplayEvaluator(log)

    def proxy_fn(proxy: str):
        def fn(removed: Sequence[int], layers: Sequence[int]) -> dict[int, float]:
            if list(removed) != log.removal_order[: len(removed)]:
                raise Diverged(removed)
            return {l: log.proxies[len(removed) + 1][proxy][l] for l in layers}
        return fn

    proxies = {prefilter: proxy_fn(prefilter)} if prefilter else {}
    diverged, note = None, ""
    with tempfile.TemporaryDirectory(prefix="stcompress-replay-") as tmp:
        search = GreedySearch(settings, evaluator, Path(tmp), proxies=proxies, prefilter=prefilter, poll_seconds=0.0)
        try:
            order = search.run().removal_order
        except Diverged as exc:
            order, note = exc.removed, exc.reason
            diverged = len(order) + 1 if note else len(order)
    same = 0
    while same < min(len(order), len(log.removal_order)) and order[same] == log.removal_order[same]:
        same += 1
    if diverged is None and same < len(order):  # the last round picked otherwise: nothing later to ask for
        diverged = same + 1
    if diverged is not None and not note:
        note = (f"round {diverged} picks layer {order[same]} where the full search picked {log.removal_order[same]}; "
                "later rounds need scores the full search never logged")
    rounds_done = diverged if diverged is not None else len(log.removal_order)
    psec = None
    if prefilter and all(prefilter in log.proxy_seconds.get(r, {}) for r in range(1, rounds_done + 1)):
        psec = round(sum(log.proxy_seconds[r][prefilter] for r in range(1, rounds_done + 1)), 3)
    calls = [c for c in evaluator.calls if c[0]]
    return Replay(name=name, config=config, removal_order=order, same_as_full=diverged is None and order == log.removal_order,
                  same_prefix=same, diverged_at=diverged, note=note, evaluations=len(calls),
                  segment_equivalents=round(sum(n / log.total_segments for _, n, _ in calls), 3),
                  seconds=round(sum(s for _, _, s in calls), 3), proxy_seconds=psec)


def standard_strategies(log: LoggedSearch, keeps: Sequence[int] = (2, 3, 4, 8)) -> tuple[list[Replay], list[str]]:
    """Prefilter by each logged proxy at each keep; successive halving (eta 3 and 2) when the dev
    references and the hypotheses are there. Returns the replays and why any was not replayed."""
    names = sorted({n for by in log.proxies.values() for n in by})
    out = [replay(log, f"prefilter {p}, keep {k}", prefilter=p, keep=k) for p in names for k in keeps]
    skipped = [] if names else ["prefilter: no proxy was logged (run importance with proxies: [block_influence, tf_loss])"]
    for eta in (3, 2):
        try:
            out.append(replay(log, f"halving, eta {eta}", halving=True, eta=eta,
                              min_segments=max(1, min(10, math.ceil(log.total_segments / eta**2)))))
        except StcompressError as exc:
            skipped.append(f"halving, eta {eta}: {exc}")
    return out, skipped
