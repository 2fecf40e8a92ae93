"""Iterative greedy layer removal (Moslem, IWSLT 2025; PAPER.md step 2), resumable and sharded.

Each round every remaining candidate is removed in turn, the dev set translated and scored, and
the candidate with the best selection score is removed for good (ties -> lowest index). The
search knows nothing about models: an `Evaluator` scores "the model without these layers".
Several processes can share one output directory: candidate k of a round goes to process
k % world; each process reads everyone's records and makes the same decisions.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from stcompress.artifacts import atomic_write_bytes
from stcompress.errors import StcompressError
from stcompress.importance.state import Record, SearchState, bytes_hash, hypotheses_name

log = logging.getLogger(__name__)


class Evaluator(Protocol):
    def evaluate(self, removed: Sequence[int], n_segments: int) -> tuple[dict[str, float], dict[str, str], list[dict[str, Any]]]:
        """Scores, score signatures and hypothesis rows of the model without `removed`."""


# A prefilter ranks a round's candidates by a cheap proxy: higher = better to remove.
Prefilter = Callable[[Sequence[int], Sequence[int]], dict[int, float]]


@dataclass(frozen=True)
class SearchSettings:
    candidates: tuple[int, ...]  # removable layers
    n_layers: int
    metric: str
    total_segments: int
    rounds: int | None = 8
    target_layers: int | None = None
    min_fraction: float | None = None
    halving: bool = False
    halving_eta: int = 3
    halving_min_segments: int = 10
    prefilter_keep: int | None = None


@dataclass
class SearchResult:
    removal_order: list[int] = field(default_factory=list)
    baseline: Record | None = None
    winners: list[Record] = field(default_factory=list)
    stop_reason: str = ""
    proxy_values: dict[int, dict[str, dict[int, float]]] = field(default_factory=dict)  # round -> proxy -> layer
    proxy_seconds: dict[int, dict[str, float]] = field(default_factory=dict)  # round -> proxy -> its cost that round


class GreedySearch:
    def __init__(
        self,
        settings: SearchSettings,
        evaluator: Evaluator,
        directory: Path,
        *,
        rank: int = 0,
        world: int = 1,
        proxies: dict[str, Prefilter] | None = None,
        prefilter: str | None = None,
        wait_timeout: float = 86400.0,
        poll_seconds: float = 2.0,
    ):
        self.s = settings
        self.evaluator = evaluator
        self.directory = Path(directory)
        self.rank, self.world = rank, world
        self.proxies = proxies or {}
        self.prefilter = prefilter
        if prefilter is not None and prefilter not in self.proxies:
            raise StcompressError(f"prefilter: proxy {prefilter!r} was not set up; known: {', '.join(self.proxies)}")
        self.wait_timeout, self.poll_seconds = wait_timeout, poll_seconds
        self.state = SearchState(self.directory, rank)

    # -- one variant -------------------------------------------------------------------------

    def _evaluate(self, round_: int, layer: int | None, removed: tuple[int, ...], segments: int) -> None:
        variant = removed if layer is None else (*removed, layer)
        t0 = time.perf_counter()
        scores, signatures, rows = self.evaluator.evaluate(list(variant), segments)
        name = hypotheses_name(round_, layer, segments, self.s.total_segments)
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
        atomic_write_bytes(self.directory / "hypotheses" / name, text)
        record = Record(
            round=round_, layer=layer, removed=removed, segments=segments, scores=scores,
            seconds=round(time.perf_counter() - t0, 3), approximate=segments < self.s.total_segments,
            signatures=signatures, hypotheses=name, hypotheses_sha256=bytes_hash(text),
        )
        self.state.append(record)  # after the hypotheses: a record implies its file exists
        log.info("round %d %s: %s=%.2f (%d segments)", round_, "baseline" if layer is None else f"-layer {layer}",
                 self.s.metric, scores[self.s.metric], segments)

    def _evaluate_all(self, round_: int, layers: Sequence[int | None], removed: tuple[int, ...], segments: int) -> list[Record]:
        """Evaluate `layers` (this process's share), then wait for the other processes' shares."""
        for k, layer in enumerate(layers):
            if k % self.world == self.rank and self.state.get(round_, layer, removed, segments) is None:
                self._evaluate(round_, layer, removed, segments)
        deadline = time.monotonic() + self.wait_timeout
        while True:
            found = [self.state.get(round_, layer, removed, segments) for layer in layers]
            if all(r is not None for r in found):
                return found  # type: ignore[return-value]
            if time.monotonic() > deadline:
                missing = [l for l, r in zip(layers, found) if r is None]
                raise StcompressError(
                    f"importance: round {round_} candidates {missing} never arrived from the other processes; "
                    "check their logs, then rerun the same command to resume"
                )
            time.sleep(self.poll_seconds)
            self.state.refresh()

    # -- one round ---------------------------------------------------------------------------

    def _best(self, records: Sequence[Record]) -> Record:
        return max(records, key=lambda r: (r.scores[self.s.metric], -(r.layer or 0)))

    def _halve(self, round_: int, layers: list[int], removed: tuple[int, ...]) -> list[int]:
        """Successive halving: score on a growing prefix of the dev set, keep the top 1/eta."""
        eta, total = self.s.halving_eta, self.s.total_segments
        rungs = max(0, math.ceil(math.log(max(len(layers), 1), eta)) - 1)
        n = max(self.s.halving_min_segments, math.ceil(total / eta**rungs))
        while len(layers) > 1 and n < total:
            records = self._evaluate_all(round_, layers, removed, n)
            ranked = sorted(records, key=lambda r: (-r.scores[self.s.metric], r.layer))
            layers = sorted(r.layer for r in ranked[: math.ceil(len(ranked) / eta)])
            n = min(total, n * eta)
        return layers

    def _round_candidates(self, round_: int, removed: tuple[int, ...], result: SearchResult) -> list[int]:
        layers = [c for c in self.s.candidates if c not in removed]
        if self.proxies:  # timed: a cheap search's cost is its proxies' plus its decodes (proxy_study)
            values, seconds = {}, {}
            for name, fn in self.proxies.items():
                t0 = time.perf_counter()
                values[name] = fn(removed, layers)
                seconds[name] = round(time.perf_counter() - t0, 3)
            result.proxy_values[round_], result.proxy_seconds[round_] = values, seconds
        if self.prefilter is not None and self.s.prefilter_keep and len(layers) > self.s.prefilter_keep:
            proxy = result.proxy_values[round_][self.prefilter]
            ranked = sorted(layers, key=lambda l: (-proxy[l], l))
            layers = sorted(ranked[: self.s.prefilter_keep])
        if self.s.halving:
            layers = self._halve(round_, layers, removed)
        return layers

    def _stop(self, round_: int, removed: tuple[int, ...]) -> str:
        remaining = self.s.n_layers - len(removed)
        if self.s.rounds is not None and round_ > self.s.rounds:
            return f"removed {self.s.rounds} layers (rounds)"
        if self.s.target_layers is not None and remaining <= self.s.target_layers:
            return f"{remaining} layers remain (target_layers)"
        if not [c for c in self.s.candidates if c not in removed]:
            return "no removable layers left"
        return ""

    def run(self) -> SearchResult:
        result = SearchResult()
        result.baseline = self._evaluate_all(0, [None], (), self.s.total_segments)[0]
        removed: tuple[int, ...] = ()
        round_ = 1
        while not (reason := self._stop(round_, removed)):
            layers = self._round_candidates(round_, removed, result)
            best = self._best(self._evaluate_all(round_, layers, removed, self.s.total_segments))
            floor = self.s.min_fraction
            if floor is not None and best.scores[self.s.metric] < floor * result.baseline.scores[self.s.metric]:
                reason = f"best candidate (layer {best.layer}) fell below {floor} x the unpruned {self.s.metric}"
                break
            result.winners.append(best)
            removed = (*removed, best.layer)  # type: ignore[arg-type]
            round_ += 1
        result.removal_order = list(removed)
        result.stop_reason = reason
        return result


def protected_default(n_layers: int) -> tuple[int, ...]:
    """The paper never removes the first and the last decoder layer."""
    return (0, n_layers - 1) if n_layers > 1 else (0,)


def candidate_layers(n_layers: int, protect: Sequence[int] | None) -> tuple[int, ...]:
    protect = protected_default(n_layers) if protect is None else tuple(protect)
    bad = [p for p in protect if not 0 <= p < n_layers]
    if bad:
        raise StcompressError(f"protect: layer {bad[0]} does not exist; the model has layers 0..{n_layers - 1}")
    candidates = tuple(i for i in range(n_layers) if i not in set(protect))
    if not candidates:
        raise StcompressError(f"protect: all {n_layers} layers are protected, nothing can be removed; protect fewer layers")
    return candidates
