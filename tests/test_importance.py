"""The greedy importance search: its decisions, stops, resume, sharding, and the CLI on a tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from stcompress import cli
from stcompress.artifacts import read_manifest
from stcompress.data.sources import builtin_manifest_path
from stcompress.errors import StcompressError
from stcompress.importance.search import GreedySearch, SearchSettings, candidate_layers
from stcompress.model import arch
from stcompress.model.load import load_model
from stcompress.config import ModelConfig
from stcompress.model.save import save_model
from stcompress.model.tiny import tiny_model_cache


class TableEvaluator:
    """Score = 50 + sum of per-layer removal gains; records every call."""

    def __init__(self, gains: dict[int, float], fail_after: int | None = None):
        self.gains, self.calls, self.fail_after = gains, [], fail_after

    def evaluate(self, removed, n_segments):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt
        self.calls.append((tuple(removed), n_segments))
        score = 50 + sum(self.gains[l] for l in removed) + 0.001 * n_segments
        return {"chrf": score}, {"chrf": "sig"}, [{"id": "x", "hypothesis": "h", "n_tokens": 1}]


def _settings(**kw):
    base = dict(candidates=(1, 2, 3, 4), n_layers=6, metric="chrf", total_segments=100, rounds=3)
    return SearchSettings(**{**base, **kw})


GAINS = {1: -5.0, 2: 1.0, 3: -1.0, 4: 1.0}  # 2 and 4 tie: the lowest index goes first


def test_greedy_removes_best_then_ties_to_lowest(tmp_path):
    result = GreedySearch(_settings(), TableEvaluator(GAINS), tmp_path).run()
    assert result.removal_order == [2, 4, 3]
    assert [w.round for w in result.winners] == [1, 2, 3]
    assert result.baseline.layer is None and "rounds" in result.stop_reason


def test_stops(tmp_path):
    assert GreedySearch(_settings(rounds=None, target_layers=4), TableEvaluator(GAINS), tmp_path / "a").run().removal_order == [2, 4]
    floor = GreedySearch(_settings(rounds=None, min_fraction=0.99), TableEvaluator(GAINS), tmp_path / "b").run()
    assert floor.removal_order == [2, 4, 3] and "fell below 0.99" in floor.stop_reason
    everything = GreedySearch(_settings(rounds=None), TableEvaluator(GAINS), tmp_path / "c").run()
    assert everything.removal_order == [2, 4, 3, 1] and everything.stop_reason == "no removable layers left"


def test_resume_after_kill_mid_round_gives_identical_result(tmp_path):
    reference = GreedySearch(_settings(), TableEvaluator(GAINS), tmp_path / "ref").run()
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        GreedySearch(_settings(), TableEvaluator(GAINS, fail_after=6), out).run()  # dies in round 2
    second = TableEvaluator(GAINS)
    resumed = GreedySearch(_settings(), second, out).run()
    assert resumed.removal_order == reference.removal_order
    assert len(second.calls) == 1 + 4 + 3 + 2 - 6  # only what had not finished
    rows = (out / "candidates.rank0.jsonl").read_text().splitlines()
    assert len(rows) == 10 and len({json.dumps(json.loads(r)["removed"]) + str(json.loads(r)["layer"]) for r in rows}) == 10


def test_torn_last_line_is_redone(tmp_path):
    GreedySearch(_settings(rounds=1), TableEvaluator(GAINS), tmp_path).run()
    path = tmp_path / "candidates.rank0.jsonl"
    data = path.read_bytes()
    path.write_bytes(data[:-20])  # a kill in the middle of the last append
    again = TableEvaluator(GAINS)
    assert GreedySearch(_settings(rounds=1), again, tmp_path).run().removal_order == [2]
    assert len(again.calls) == 1 and path.read_bytes().endswith(b"\n")


def _tamper(path, old, new):
    data = path.read_text()
    assert old in data
    path.write_text(data.replace(old, new, 1))


@pytest.mark.parametrize("what", ["score", "corrupt last line", "hypotheses edited", "hypotheses deleted"])
def test_tampered_resume_state_is_refused_naming_the_file(tmp_path, what):
    """Everything a resume reads carries a checksum; a complete record or hypotheses file that was
    changed after it was written is refused, never used (issue 9 item 6)."""
    with pytest.raises(KeyboardInterrupt):
        GreedySearch(_settings(), TableEvaluator(GAINS, fail_after=6), tmp_path).run()
    state, hyp = tmp_path / "candidates.rank0.jsonl", tmp_path / "hypotheses" / "round01-layer02.jsonl"
    if what == "score":
        _tamper(state, '"chrf": 51.1', '"chrf": 99.0')
        expected = "candidates.rank0.jsonl: line 3 does not match its checksum"
    elif what == "corrupt last line":  # complete (newline-terminated): not what a kill leaves
        state.write_text(state.read_text() + '{"round": 2, "layer"\n')
        expected = "candidates.rank0.jsonl: line 7 is corrupt"
    elif what == "hypotheses edited":
        _tamper(hyp, '"h"', '"H"')
        expected = "round01-layer02.jsonl: missing or changed since it was scored"
    else:
        hyp.unlink()
        expected = "round01-layer02.jsonl: missing or changed since it was scored"
    again = TableEvaluator(GAINS)
    with pytest.raises(StcompressError, match=expected):
        GreedySearch(_settings(), again, tmp_path).run()
    assert again.calls == []


def test_two_processes_share_rounds_and_agree(tmp_path):
    single = GreedySearch(_settings(), TableEvaluator(GAINS), tmp_path / "one").run()
    evaluators = [TableEvaluator(GAINS), TableEvaluator(GAINS)]
    results = [None, None]

    def worker(rank):
        search = GreedySearch(_settings(), evaluators[rank], tmp_path / "two", rank=rank, world=2, poll_seconds=0.01, wait_timeout=60)
        results[rank] = search.run()

    threads = [threading.Thread(target=worker, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[0].removal_order == results[1].removal_order == single.removal_order
    assert len(evaluators[0].calls) + len(evaluators[1].calls) == 1 + 4 + 3 + 2
    assert evaluators[1].calls and evaluators[0].calls


def test_successive_halving_is_labelled_approximate(tmp_path):
    evaluator = TableEvaluator(GAINS)
    settings = _settings(candidates=tuple(range(1, 10)), n_layers=11, rounds=1, halving=True, halving_eta=3, halving_min_segments=10)
    evaluator.gains = {l: float(l % 5) for l in range(1, 10)}
    search = GreedySearch(settings, evaluator, tmp_path)
    result = search.run()
    assert result.removal_order == [4]
    partial = [r for r in search.state.all_records() if r.approximate]
    assert partial and all(r.segments < 100 for r in partial)
    decoded = sum(n for removed, n in evaluator.calls if removed)
    assert decoded < 9 * 100  # fewer segments decoded than the exhaustive round (606 vs 900 here)


def test_prefilter_limits_generation_candidates(tmp_path):
    evaluator = TableEvaluator(GAINS)
    proxy = {"fake": lambda removed, layers: {l: float(GAINS[l]) for l in layers}}
    settings = _settings(rounds=1, prefilter_keep=2)
    result = GreedySearch(settings, evaluator, tmp_path, proxies=proxy, prefilter="fake").run()
    assert result.removal_order == [2] and len(evaluator.calls) == 1 + 2
    assert result.proxy_values[1]["fake"] == {1: -5.0, 2: 1.0, 3: -1.0, 4: 1.0}


def test_candidate_layers_and_protection():
    assert candidate_layers(32, None) == tuple(range(1, 31))  # the paper: 0 and 31 never removed
    with pytest.raises(StcompressError, match="all 4 layers are protected"):
        candidate_layers(4, [0, 1, 2, 3])
    with pytest.raises(StcompressError, match="protect: layer 9 does not exist"):
        candidate_layers(4, [9])


# -- end to end on a tiny model -------------------------------------------------------------


@pytest.fixture(scope="module")
def engineered(tmp_path_factory):
    """A 6-layer tiny model where layer 2 is harmless (its output projections are zero) and layer 3
    is critical (scaled up); dev references are the unpruned model's own greedy outputs."""
    root = tmp_path_factory.mktemp("engineered")
    loaded = load_model(ModelConfig(path=str(tiny_model_cache(text_layers=6, seed=3))))
    layers = arch.decoder_layers(loaded.model)
    with torch.no_grad():
        layers[2].self_attn.o_proj.weight.zero_()
        layers[2].mlp.down_proj.weight.zero_()
        layers[3].self_attn.o_proj.weight.mul_(4.0)
        layers[3].mlp.down_proj.weight.mul_(4.0)
    model_dir = save_model(loaded.model, loaded.processor, root / "model")
    out = root / "refs"
    assert cli.main(["translate", "--model.path", str(model_dir), "--data.limit", "4", "--generation.max-new-tokens", "8",
                     "--output", str(out), "-q"]) == 0
    builtin = builtin_manifest_path().parent
    rows = [json.loads(l) for l in (out / "hypotheses.jsonl").read_text().splitlines()]
    manifest = root / "dev.jsonl"
    manifest.write_text("".join(json.dumps({"id": r["id"], "audio": str(builtin / f"{r['id']}.flac"),
                                            "text_de": r["hypothesis"]}) + "\n" for r in rows))
    return model_dir, manifest


def _importance_args(model_dir, manifest, out, *extra):
    return ["importance", "--model.path", str(model_dir), "--data.dataset", str(manifest), "--rounds", "2",
            "--generation.max-new-tokens", "8", "--output", str(out), "-q", *extra]


def test_search_finds_the_harmless_layer(engineered, tmp_path):
    model_dir, manifest = engineered
    out = tmp_path / "imp"
    assert cli.main(_importance_args(model_dir, manifest, out, "--proxies", "block_influence,tf_loss")) == 0
    result = json.loads((out / "removal_order.json").read_text())
    assert result["metric"] == "chrf++" and result["baseline"]["chrf++"] == pytest.approx(100.0)
    assert result["removal_order"][0] == 2 and result["rounds"][0]["scores"]["chrf++"] == pytest.approx(100.0)
    round1 = {r["layer"]: r["scores"]["chrf++"] for r in map(json.loads, (out / "candidates.jsonl").read_text().splitlines())
              if r["round"] == 1}
    assert set(round1) == {1, 2, 3, 4} and round1[3] < round1[2]
    assert (out / "heatmap.png").stat().st_size > 1000 and (out / "hypotheses" / "round01-layer03.jsonl").is_file()
    proxies = json.loads((out / "proxies.json").read_text())
    assert proxies["rounds"]["1"]["block_influence"]["2"] == pytest.approx(0.0, abs=1e-6)  # identity layer: BI 0
    assert set(proxies["correlation"]) == {"block_influence", "tf_loss"}
    manifest_json = read_manifest(out)
    assert manifest_json["stage"] == "importance" and manifest_json["removal_order"] == result["removal_order"]

    # prune the first removed layer, reload-check included; a plain transformers process loads it
    pruned = tmp_path / "pruned"
    assert cli.main(["prune", "--importance", str(out), "--num-layers", "1", "--data.dataset", str(manifest),
                     "--output", str(pruned), "-q"]) == 0
    pm = read_manifest(pruned)
    assert pm["removed_layers"] == [2] and pm["layer_map"] == [0, 1, 3, 4, 5] and pm["reload_check"]["identical"]
    code = (
        "import sys, transformers; m = transformers.Qwen2AudioForConditionalGeneration.from_pretrained(sys.argv[1]);"
        "transformers.AutoProcessor.from_pretrained(sys.argv[1]);"
        "assert m.config.text_config.num_hidden_layers == 5; assert 'stcompress' not in sys.modules; print('ok')"
    )
    done = subprocess.run([sys.executable, "-c", code, str(pruned)], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_cli_resume_after_interrupt(engineered, tmp_path, monkeypatch):
    from stcompress.importance import evaluator as ev

    model_dir, manifest = engineered
    full, out = tmp_path / "full", tmp_path / "resumed"
    assert cli.main(_importance_args(model_dir, manifest, full)) == 0
    real = ev.GenerationEvaluator.evaluate
    calls = []

    def dying(self, removed, n):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(removed)
        return real(self, removed, n)

    monkeypatch.setattr(ev.GenerationEvaluator, "evaluate", dying)
    assert cli.main(_importance_args(model_dir, manifest, out)) == 130
    assert not (out / "manifest.json").exists()  # unfinished: nothing looks complete
    monkeypatch.setattr(ev.GenerationEvaluator, "evaluate", real)
    assert cli.main(_importance_args(model_dir, manifest, out)) == 0
    read = lambda d: [(r["round"], r["layer"], r["scores"]) for r in map(json.loads, (d / "candidates.jsonl").read_text().splitlines())]
    assert read(out) == read(full)
    assert json.loads((out / "removal_order.json").read_text())["removal_order"] == \
        json.loads((full / "removal_order.json").read_text())["removal_order"]
    assert read_manifest(out)["resumed"] is True
    # a finished search is not redone; a different one is refused
    assert cli.main(_importance_args(model_dir, manifest, out)) == 0
    assert cli.main(_importance_args(model_dir, manifest, out, "--metric", "bleu")) == 2


def test_own_temp_file_from_a_kill_is_not_foreign(engineered, tmp_path):
    """A kill during the first write of search.json leaves its temp file: not a foreign file, and
    removed on the next start (issue 9 item 4)."""
    model_dir, manifest = engineered
    out = tmp_path / "out"
    (out / "hypotheses").mkdir(parents=True)
    (out / ".search.json.x1y2.tmp").write_text("{")
    (out / "hypotheses" / ".baseline.jsonl.abc.tmp").write_text('{"id"')
    assert cli.main(_importance_args(model_dir, manifest, out, "--rounds", "1", "--data.limit", "2")) == 0
    assert read_manifest(out)["stage"] == "importance"
    assert not [p.name for p in out.rglob(".*.tmp")]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    assert cli.main(_importance_args(model_dir, manifest, tmp_path / "mine", "--rounds", "1")) == 2


def _interrupted_search(monkeypatch, args, after=3):
    from stcompress.importance import evaluator as ev

    real = ev.GenerationEvaluator.evaluate
    calls = []

    def dying(self, removed, n):
        if len(calls) == after:
            raise KeyboardInterrupt
        calls.append(removed)
        return real(self, removed, n)

    monkeypatch.setattr(ev.GenerationEvaluator, "evaluate", dying)
    assert cli.main(args) == 130
    monkeypatch.setattr(ev.GenerationEvaluator, "evaluate", real)


def test_resume_refuses_other_model_or_data_content_at_the_same_path(engineered, tmp_path, monkeypatch, capsys):
    """The resume state is bound to the content of its inputs, not only their paths: another model
    (an upstream stage reran) or edited data at the same path is refused, --restart starts over and
    ends like a clean search of the new inputs (issue 9 item 5)."""
    import shutil

    model_dir, manifest = engineered
    model, data, out = tmp_path / "model", tmp_path / "dev.jsonl", tmp_path / "out"
    shutil.copytree(model_dir, model)
    shutil.copy(manifest, data)
    args = _importance_args(model, data, out, "--rounds", "1", "--data.limit", "2")
    _interrupted_search(monkeypatch, args, after=2)
    capsys.readouterr()
    shutil.rmtree(model)
    shutil.copytree(tiny_model_cache(text_layers=6, seed=4), model)  # same path, other weights
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "holds a search of other inputs (the content of the model changed" in err and "--restart" in err
    assert len(err.strip().splitlines()) == 1
    lines = data.read_text().splitlines()
    data.write_text("\n".join([lines[0].replace('"text_de": "', '"text_de": "x'), *lines[1:]]) + "\n")
    assert cli.main(args) == 2
    assert "the content of the model and data changed" in capsys.readouterr().err
    assert cli.main([*args, "--restart"]) == 0
    clean = tmp_path / "clean"
    assert cli.main(_importance_args(model, data, clean, "--rounds", "1", "--data.limit", "2")) == 0
    read = lambda d: [{k: v for k, v in json.loads(r).items() if k != "seconds"} for r in (d / "candidates.jsonl").read_text().splitlines()]
    assert read(out) == read(clean) and read_manifest(out)["resumed"] is False


@pytest.mark.parametrize(
    "extra, message",
    [(["--protect", "0,1,2,3,4,5"], "all 6 layers are protected"), (["--data.limit", "1", "--data.subset", "test", "--data.test-size", "0"], "'test' is empty"),
     (["--metric", "meteor"], "unknown metric 'meteor'")],
)
def test_importance_bad_inputs(engineered, tmp_path, capsys, extra, message):
    model_dir, manifest = engineered
    assert cli.main(_importance_args(model_dir, manifest, tmp_path / "o", *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_prune_bad_inputs(engineered, tmp_path, capsys):
    model_dir, manifest = engineered
    base = ["prune", "--model.path", str(model_dir), "--data.dataset", str(manifest), "--output", str(tmp_path / "p"), "-q"]
    assert cli.main([*base, "--layers", "1,17"]) == 2
    assert "layers: layer index 17 is out of range; the decoder has layers 0..5" in capsys.readouterr().err
    assert cli.main(base) == 2
    assert "nothing to remove" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_encoder_search_on_tiny_model(engineered, tmp_path):
    """The paper's encoder ablation: audio-encoder layers ranked the same way (features re-encoded)."""
    model_dir, manifest = engineered
    out = tmp_path / "enc"
    args = ["importance", "--model.path", str(model_dir), "--data.dataset", str(manifest), "--component", "encoder",
            "--protect", "", "--rounds", "1", "--generation.max-new-tokens", "8", "--output", str(out), "-q"]
    assert cli.main(args) == 0
    result = json.loads((out / "removal_order.json").read_text())
    assert result["component"] == "encoder" and len(result["removal_order"]) == 1
    rows = [json.loads(l) for l in (out / "candidates.jsonl").read_text().splitlines()]
    assert {r["layer"] for r in rows if r["round"] == 1} == {0, 1}
    assert cli.main(["prune", "--importance", str(out), "--output", str(tmp_path / "p"), "-q"]) == 2  # not decoder layers


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(engineered, tmp_path):
    """Launched like on a multi-GPU machine (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK), here on CPU."""
    model_dir, manifest = engineered
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli.main([*_importance_args(model_dir, manifest, one), "--model.device", "cpu"]) == 0
    torchrun = Path(sys.executable).with_name("torchrun")
    done = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", "-m", "stcompress", *_importance_args(model_dir, manifest, two),
         "--model.device", "cpu"], capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    read = lambda d: [(r["round"], r["layer"], r["scores"]) for r in map(json.loads, (d / "candidates.jsonl").read_text().splitlines())]
    assert read(two) == read(one)
    assert len(list(two.glob("candidates.rank*.jsonl"))) == 2 and read_manifest(two)["world_size"] == 2
