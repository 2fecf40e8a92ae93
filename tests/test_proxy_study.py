"""The proxy study's replay (stcompress.importance.replay) against cheaper searches run for real.

A synthetic search: each removed layer garbles a fixed set of dev segments, the metric is real
chrF++ of the resulting hypotheses; two proxies are logged per candidate. The replay must pick what
the product's own prefiltered / halving search picks when it really runs (up to where the logged
scores run out), count its decodes, and say where it diverged.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from stcompress.errors import StcompressError
from stcompress.importance.replay import full_cost, load_search, replay, round_correlations, standard_strategies
from stcompress.importance.search import GreedySearch, SearchSettings
from stcompress.metrics.text import corpus_scores
from stcompress.stages.importance import proxy_report

ROOT = Path(__file__).resolve().parents[1]
REFS = [f"Satz Nummer {i} ist gut." for i in range(8)]
# layer -> dev segments it garbles. Full round 1: layer 2 wins (2 garbled); on the first 4 segments
# layers 1 and 3 look perfect, so a halving search drops 2 early and picks 1 instead.
DAMAGE = {1: {4, 6, 7}, 2: {0, 1}, 3: {5, 6, 7}, 4: set(range(8)), 5: {3}}


class TextEvaluator:
    def __init__(self):
        self.calls = []

    def evaluate(self, removed, n_segments):
        self.calls.append((tuple(removed), n_segments))
        bad = set().union(*(DAMAGE[l] for l in removed)) if removed else set()
        hyps = ["xq" if i in bad else REFS[i] for i in range(n_segments)]
        scores = {k: s.score for k, s in corpus_scores(["chrf++"], hyps, REFS[:n_segments], "de").items()}
        return scores, {"chrf++": "sig"}, [{"id": f"s{i}", "hypothesis": h, "n_tokens": 3} for i, h in enumerate(hyps)]


def _proxies():
    # "good": minus the garbled count (ranks like the metric); "early": only sees the first 4
    # segments (misleads in round 1); both "higher = better to remove"
    def good(removed, layers):
        return {l: -float(len(DAMAGE[l] | set().union(*(DAMAGE[r] for r in removed)))) for l in layers}

    def early(removed, layers):
        return {l: -float(len({i for i in DAMAGE[l] if i < 4})) - 0.1 * l for l in layers}

    def late(removed, layers):  # "good" until the last round, then the highest index first (keeps 3 and 4)
        return good(removed, layers) if len(removed) < 2 else {l: float(l) for l in layers}

    return {"good": good, "early": early, "late": late}


def _settings(**kw):
    base = dict(candidates=(1, 2, 3, 4, 5), n_layers=7, metric="chrf++", total_segments=8, rounds=3)
    return SearchSettings(**{**base, **kw})


@pytest.fixture
def logged(tmp_path):
    """A finished full search with both proxies logged, laid out as the importance stage writes it."""
    d = tmp_path / "importance"
    search = GreedySearch(_settings(), TextEvaluator(), d, proxies=_proxies())
    result = search.run()
    records = search.state.all_records()
    (d / "candidates.jsonl").write_text("".join(r.to_json() + "\n" for r in records))
    (d / "proxies.json").write_text(json.dumps(proxy_report(result, records, "chrf++")))
    kept = [i for i in range(7) if i not in result.removal_order]
    (d / "removal_order.json").write_text(json.dumps({"metric": "chrf++", "removal_order": result.removal_order,
                                                      "kept_layers": kept, "approximations": []}))
    (d / "manifest.json").write_text(json.dumps({"stage": "importance", "config": {"protect": None, "data": {"target_lang": "de"}}}))
    log = load_search(d)
    log.references = {f"s{i}": [r] for i, r in enumerate(REFS)}
    return log, result


def _real(tmp_path, name, **kw):
    """The cheaper search run for real (the product's GreedySearch on the synthetic evaluator)."""
    evaluator = TextEvaluator()
    prefilter = kw.pop("prefilter", None)
    proxies = {prefilter: _proxies()[prefilter]} if prefilter else {}
    order = GreedySearch(_settings(**kw), evaluator, tmp_path / name, proxies=proxies, prefilter=prefilter).run().removal_order
    return order, [c for c in evaluator.calls if c[0]]


def test_full_search_and_correlations(logged):
    log, result = logged
    assert result.removal_order == [5, 2, 1] and log.removal_order == [5, 2, 1]
    corr = round_correlations(log)
    assert set(corr) == {1, 2, 3}
    assert set(log.proxy_seconds) == {1, 2, 3} and set(log.proxy_seconds[1]) == {"good", "early", "late"}  # timed per round
    assert corr[1]["good"]["spearman"] == pytest.approx(1.0) and corr[1]["good"]["winner_rank"] == 1
    assert corr[1]["good"]["top1_is_winner"] and corr[1]["good"]["candidates"] == 5
    # "early" puts round 1's winner (layer 5, garbles segment 3) behind 1 and 3 (clean on the first 4)
    assert corr[1]["early"]["winner_rank"] == 3 and not corr[1]["early"]["top1_is_winner"]
    assert full_cost(log) == {"evaluations": 5 + 4 + 3, "seconds": pytest.approx(sum(
        r.seconds for r in log.records.values() if r.layer is not None and r.round <= 3), abs=1e-3)}


def test_prefilter_replay_equals_the_real_prefiltered_search(logged, tmp_path):
    log, _ = logged
    good = replay(log, "good 2", prefilter="good", keep=2)
    order, calls = _real(tmp_path, "good", prefilter="good", prefilter_keep=2)
    assert good.same_as_full and good.diverged_at is None and good.removal_order == order == [5, 2, 1]
    assert good.evaluations == len(calls) == 2 + 2 + 2 and good.config == {"prefilter": "good", "prefilter_keep": 2}
    bad = replay(log, "early 2", prefilter="early", keep=2)
    order, _ = _real(tmp_path, "early", prefilter="early", prefilter_keep=2)
    assert bad.diverged_at == 1 and bad.same_prefix == 0 and not bad.same_as_full
    assert bad.removal_order == order[:1] == [1] and "round 1 picks layer 1" in bad.note
    assert bad.evaluations == 2  # its round 1 only: round 2 would need decodes the full search never made
    late = replay(log, "late 2", prefilter="late", keep=2)  # wrong only in the last round: no later call to fail
    order, _ = _real(tmp_path, "late", prefilter="late", prefilter_keep=2)
    assert late.removal_order == order == [5, 2, 3] and late.diverged_at == 3 and late.same_prefix == 2
    assert not late.same_as_full and "round 3 picks layer 3" in late.note


def test_halving_replay_equals_the_real_halving_search(logged, tmp_path):
    log, _ = logged
    rep = replay(log, "halving", halving=True, eta=2, min_segments=2)
    order, calls = _real(tmp_path, "halving", halving=True, halving_eta=2, halving_min_segments=2)
    assert rep.removal_order == order[: len(rep.removal_order)]
    assert rep.config == {"halving": True, "halving_eta": 2, "halving_min_segments": 2}
    assert rep.diverged_at == 1 and rep.removal_order == [1]  # layer 5 garbles segment 3: dropped on the prefix
    assert rep.segment_equivalents == pytest.approx(sum(n for _, n in calls[: rep.evaluations]) / 8)
    assert rep.segment_equivalents < 5  # cheaper than round 1's 5 whole-dev decodes


def test_halving_needs_references_and_hypotheses(logged):
    log, _ = logged
    log.references = None
    with pytest.raises(StcompressError, match="needs the dev references"):
        replay(log, "h", halving=True, eta=2, min_segments=2)
    strategies, skipped = standard_strategies(log, keeps=(2,))
    assert [s.name for s in strategies] == ["prefilter early, keep 2", "prefilter good, keep 2", "prefilter late, keep 2"]
    assert len(skipped) == 2 and all("halving" in s for s in skipped)


def test_unlogged_proxy_and_not_an_importance_dir(logged, tmp_path):
    log, _ = logged
    with pytest.raises(StcompressError, match="'angular' is not logged"):
        replay(log, "x", prefilter="angular", keep=2)
    with pytest.raises(StcompressError, match="not a finished importance output"):
        load_search(tmp_path)


def test_study_script_writes_markdown_and_json(logged, tmp_path):
    spec = importlib.util.spec_from_file_location("proxy_study", ROOT / "benchmarks" / "testbed" / "proxy_study.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    log, _ = logged
    mod.references = lambda log_, data: {f"s{i}": [r] for i, r in enumerate(REFS)}  # no dev manifest in this test
    prune = log.directory.parent / "prune1"
    prune.mkdir()
    (prune / "manifest.json").write_text(json.dumps({"stage": "prune", "config": {"importance": "x"}, "removed_layers": [5]}))
    out = tmp_path / "study.md"
    assert mod.main([str(log.directory.parent), "--out", str(out), "--keep", "2"]) == 0
    res = json.loads(out.with_suffix(".json").read_text())
    assert res["removal_order"] == [5, 2, 1] and res["proxies_absent"] == ["angular_distance"]
    assert res["correlation"]["1"]["good"]["spearman"] == pytest.approx(1.0)
    names = [s["name"] for s in res["strategies"]]
    assert names == ["prefilter early, keep 2", "prefilter good, keep 2", "prefilter late, keep 2", "halving, eta 3", "halving, eta 2"]
    by_name = {s["name"]: s for s in res["strategies"]}
    assert by_name["prefilter good, keep 2"]["same_models"] == ["prune1"] and by_name["prefilter early, keep 2"]["same_models"] == []
    text = out.read_text()
    assert "| 1 | good | 5 | 1.000 | 1 | yes |" in text and "diverged at round 1" in text
