"""`--size-budget`: budget strings, the picker's rule, predicted sizes, and export / run with a budget."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import transformers

from stcompress import budget, cli
from stcompress.artifacts import read_manifest
from stcompress.budget import Candidate, choose, fits, layer_options, parse_size, preference
from stcompress.config import DataConfig, ExportConfig, RunConfig, load_config
from stcompress.errors import ConfigError
from stcompress.model import arch
from stcompress.quantize import KEEP
from stcompress.sizes import predict
from stcompress.stages import export
from stcompress.stages import run as run_stage


def test_parse_size_decimal_and_binary_units():
    assert parse_size("4GB") == 4 * 10**9  # the track's GB: 10^9 bytes
    assert parse_size("1.5 GiB") == int(1.5 * 2**30)
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size(" 4gb ") == 4 * 10**9
    assert parse_size("750kB") == 750_000
    assert parse_size("123") == 123 and parse_size("2e9") == 2 * 10**9
    for bad in ("4 GQ", "-1GB", "0GB", "", "GB", "4 G B", "four GB"):
        with pytest.raises(ValueError, match=r"size_budget: .*GB = 10\^9 bytes"):
            parse_size(bad)


def test_bad_budget_refused_before_any_model_loads(tmp_path, capsys):
    with pytest.raises(ConfigError, match="size_budget: '4 gigs' is not a size"):
        load_config(ExportConfig, {"input": "x", "size_budget": "4 gigs"})
    with pytest.raises(ConfigError, match="size_budget: '2XB' is not a size"):
        load_config(RunConfig, {"recipe": "r.yaml", "size_budget": "2XB"})
    with pytest.raises(ConfigError, match="budget_formats: unknown format 'gptq'"):
        load_config(ExportConfig, {"input": "x", "size_budget": "4GB", "budget_formats": "none,gptq"})
    with pytest.raises(ConfigError, match="num_layers: required with importance"):
        load_config(ExportConfig, {"input": "x", "importance": "imp"})
    # the CLI: one line, exit 2, nothing written (the input does not even exist: the budget is checked first)
    rc = cli.main(["export", "--input", str(tmp_path / "missing"), "--size-budget", "4 GQ", "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("stcompress export: error: size_budget: '4 GQ'")
    assert not (tmp_path / "out").exists()


def _c(kept=4, dec=4, head=16, tower=16, proj=16, fmt="hqq", vocab=None, size=100, saved=None) -> Candidate:
    bits = (("audio_tower", tower), ("projector", proj), ("decoder_layers", dec), ("lm_head", head), ("embed_tokens", KEEP))
    return Candidate(fmt, bits, 0, kept, vocab, size, size if saved is None else saved)


def test_preference_rule():
    # (1) more kept layers beat higher bits
    assert choose([_c(kept=3, dec=16), _c(kept=4, dec=2)], 1000).kept_layers == 4
    # (2) the weaker of LM head and decoder first: decoder 4 + head 8 beats decoder 8 + head 2 and decoder 2 + head 16
    best = choose([_c(dec=8, head=2), _c(dec=4, head=8), _c(dec=2, head=16)], 1000)
    assert (best.bit("decoder_layers"), best.bit("lm_head")) == (4, 8)
    # (3) then decoder bits, (4) then LM-head bits, (5) then tower and projector bits
    assert choose([_c(dec=4, head=8), _c(dec=8, head=4)], 1000).bit("decoder_layers") == 8
    assert choose([_c(dec=4, head=4), _c(dec=4, head=8)], 1000).bit("lm_head") == 8
    assert choose([_c(tower=4), _c(tower=8)], 1000).bit("audio_tower") == 8
    assert choose([_c(proj=4), _c(proj=16)], 1000).bit("projector") == 16
    # (6) the full vocabulary over a trimmed one; (7) the earlier format; (8) the smaller size
    assert choose([_c(vocab=2000), _c(vocab=None)], 1000).vocab_size is None
    assert choose([_c(dec=8, head=8, fmt="hqq"), _c(dec=8, head=8, fmt="int8")], 1000).fmt == "int8"
    assert choose([_c(size=300), _c(size=200)], 1000).predicted == 200
    assert preference(_c(kept=5)) > preference(_c(kept=4, dec=16, head=16))
    # only candidates that fit count; nothing fits: None
    assert choose([_c(kept=4, size=2000), _c(kept=3, size=500)], 1000).kept_layers == 3
    assert choose([_c(size=2000)], 1000) is None


def test_fits_margin_and_measures():
    c = _c(size=1000, saved=2000)
    assert fits(c, math.ceil(1000 * (1 + budget.MARGIN)), "safetensors")
    assert not fits(c, 1000, "safetensors")  # headers and zip records need the margin
    assert not fits(c, 1500, "both") and not fits(c, 1500, "torch_save")
    assert fits(c, 2100, "both")


def test_layer_options_follow_the_order_and_skip_layers_already_gone():
    assert layer_options([3, 1, 2], [0, 1, 2, 3]) == [(0, []), (1, [3]), (2, [3, 1]), (3, [3, 1, 2])]
    # layer 1 already pruned upstream: removing it again changes nothing, so K=1 gives no new option
    assert layer_options([1, 3, 2], [0, 2, 3]) == [(0, []), (2, [3]), (3, [3, 2])]
    assert layer_options([1, 0], [0, 1], fixed=1) == [(1, [1])]
    assert layer_options([1, 0], [0, 1], fixed=2) == []  # nothing left


def _with_layers(config, n: int):
    config = copy.deepcopy(config)
    text = arch.text_config(config)
    text.num_hidden_layers = n
    if getattr(text, "layer_types", None):
        text.layer_types = text.layer_types[:n]
    return config


@pytest.mark.parametrize("fmt,bits", [("none", {}), ("int8", {"lm_head": 8}), ("nf4", {"audio_tower": 16})])
def test_size_table_equals_the_predictor(tiny_model_dir, fmt, bits):
    config = transformers.AutoConfig.from_pretrained(str(tiny_model_dir))
    table = budget.SizeTable(config, "bfloat16", 64)
    chosen = {c: (KEEP if fmt == "none" else {"int8": 8, "nf4": 4}[fmt]) for c in budget.VARIED} | bits
    full = {**chosen, "embed_tokens": KEEP}
    assert table.total(fmt, chosen, 4, None) == predict(config, fmt, full, "bfloat16")["total"]
    assert table.total(fmt, chosen, 3, None) == predict(_with_layers(config, 3), fmt, full, "bfloat16")["total"]
    trimmed = copy.deepcopy(config)
    arch.text_config(trimmed).vocab_size = 2048
    assert table.total(fmt, chosen, 4, 2048) == predict(trimmed, fmt, full, "bfloat16")["total"]


# ---------------------------------------------------------------------------------------------
# Export with a budget (tiny model, CPU)


def _cfg(tmp_path: Path, input: Path, **kw) -> ExportConfig:
    fields = {"dtype": "bfloat16", "device": "cpu", "check_segments": 1, "check_max_new_tokens": 4, "data": DataConfig(limit=1)}
    return ExportConfig(output=str(tmp_path / "export"), input=str(input), **(fields | kw))


def _importance(tmp_path: Path, order: list[int], layers: int = 4) -> Path:
    """An importance output's record (the removal order is what export reads)."""
    d = tmp_path / "importance"
    d.mkdir()
    (d / "manifest.json").write_text(json.dumps({"stage": "importance", "config": {"component": "decoder"},
                                                 "removal_order": order, "model": {"decoder_layers": layers}}))
    return d


def _table(tiny_model_dir) -> budget.SizeTable:
    return budget.SizeTable(transformers.AutoConfig.from_pretrained(str(tiny_model_dir)), "bfloat16", 64)


def test_budget_removes_layers_when_only_that_fits(tmp_path, tiny_model_dir):
    table = _table(tiny_model_dir)
    bf16 = dict.fromkeys(budget.VARIED, KEEP)
    three = table.total("none", bf16, 3, None)
    limit = math.ceil(three * (1 + budget.MARGIN))
    assert not fits(_c(size=table.total("none", bf16, 4, None)), limit)
    imp = _importance(tmp_path, [2, 1])
    out = export.run(_cfg(tmp_path, tiny_model_dir, size_budget=str(limit), budget_formats=("none",), importance=str(imp)),
                     progress=False)
    manifest = read_manifest(out)
    assert manifest["size_budget"]["picked"]["kept_layers"] == 3 and manifest["config"]["num_layers"] == 1
    assert manifest["removed_layers"] == [2] and manifest["layer_map"] == [0, 1, 3]
    measured = manifest["measured_bytes"]
    assert measured["safetensors"] <= limit and measured["torch_save"] <= limit
    assert measured["safetensors"] == sum(f.stat().st_size for f in out.glob("*.safetensors"))
    reloaded = transformers.Qwen2AudioForConditionalGeneration.from_pretrained(str(out))
    assert arch.num_decoder_layers(reloaded) == 3
    card = (out / "README.md").read_text()
    assert f"`*.safetensors` files: {measured['safetensors']:,} bytes" in card
    assert f"`torch.save(model.state_dict())`: {measured['torch_save']:,} bytes" in card
    assert f"size budget {limit}" in card and "3 decoder layers, bf16" in card


def test_budget_picks_quantized_bits_and_torch_save_is_measured(tmp_path, tiny_model_dir):
    import io

    import torch

    out = export.run(_cfg(tmp_path, tiny_model_dir, size_budget="30MB", budget_formats=("none", "int8", "nf4")), progress=False)
    manifest = read_manifest(out)
    picked = manifest["size_budget"]["picked"]
    # bf16 (39.5 MB) and int8 (30.2 MB) do not fit 30 MB; nf4 with the LM head in 4 bits does (the head in
    # bf16 would not): the rule's best among nf4's options
    assert picked["format"] == "nf4" and manifest["config"]["quantize"] == "nf4"
    assert picked["bits"]["decoder_layers"] == 4 and picked["bits"]["lm_head"] == 4 and picked["bits"]["audio_tower"] == 16
    measured = manifest["measured_bytes"]
    assert max(measured["safetensors"], measured["torch_save"]) <= 30e6
    model = transformers.Qwen2AudioForConditionalGeneration.from_pretrained(str(out), dtype=torch.bfloat16)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    assert measured["torch_save"] == len(buf.getvalue())


def test_budget_nothing_fits_is_one_line_before_loading(tmp_path, tiny_model_dir, capsys):
    rc = cli.main(["export", "--input", str(tiny_model_dir), "--size-budget", "1MB", "--budget-formats", "none,nf4",
                   "--device", "cpu", "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "size_budget: 1MB (1,000,000 bytes): no configuration is predicted to fit; the smallest is" in err[0]
    assert "give --importance" in err[0] and "raise the budget" in err[0]
    assert not (tmp_path / "out").exists()


def test_measured_over_budget_fails_and_leaves_nothing(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """Predicted to fit with no margin at all, measured over it (safetensors headers): refused, discarded."""
    exact = _table(tiny_model_dir).total("none", dict.fromkeys(budget.VARIED, KEEP), 4, None)
    monkeypatch.setattr(budget, "MARGIN", 0.0)
    rc = cli.main(["export", "-q", "--input", str(tiny_model_dir), "--size-budget", str(exact), "--budget-formats", "none",
                   "--device", "cpu", "--check-segments", "1", "--check-max-new-tokens", "2", "--data.limit", "1",
                   "--output", str(tmp_path / "out")])
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "stcompress" in line]
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"stcompress export: error: size_budget: {exact} ({exact:,} bytes) exceeded: measured safetensors")
    assert "the export was discarded" in err[0] and "raise the budget" in err[0]
    assert list(tmp_path.iterdir()) == []  # no output, no staging directory


def test_run_size_budget_reaches_every_export_stage(tmp_path, tiny_model_dir):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"run_dir": str(tmp_path / "run"), "stages": [  # de-model-b's end: bf16 merge -> nf4
        {"name": "export", "stage": "export", "config": {"input": str(tiny_model_dir)}},
        {"name": "eval", "stage": "evaluate", "config": {"model": {"path": "${export}"}}},
        {"name": "export-nf4", "stage": "export", "config": {"input": "${export}", "quantize": "nf4"}}]}))
    parsed = run_stage.with_size_budget(run_stage.parse_recipe(recipe), "2GB")
    assert parsed.step("export-nf4").config.size_budget == "2GB"
    assert parsed.step("export").config.size_budget is None  # it feeds another export: left as it is
    plain = run_stage.parse_recipe(recipe)
    assert parsed.step("export-nf4").config_hash() != plain.step("export-nf4").config_hash()  # so a finished export reruns
    only_eval = tmp_path / "e.yaml"
    only_eval.write_text(json.dumps({"run_dir": str(tmp_path / "run2"), "stages": [
        {"name": "eval", "stage": "evaluate", "config": {"model": {"path": str(tiny_model_dir)}}}]}))
    with pytest.raises(ConfigError, match="size_budget: .* has no export stage"):
        run_stage.with_size_budget(run_stage.parse_recipe(only_eval), "2GB")


def test_fixed_options_restrict_the_space(tmp_path, tiny_model_dir):
    config = transformers.AutoConfig.from_pretrained(str(tiny_model_dir))
    cfg = _cfg(tmp_path, tiny_model_dir, size_budget="35MB", quantize="int8", bits="lm_head=16")
    with pytest.raises(ConfigError, match="no configuration is predicted to fit.*fix fewer options"):
        budget.plan_export(cfg, config, {})  # int8 with a bf16 head is 39 MB
    picked, plan = budget.plan_export(_cfg(tmp_path, tiny_model_dir, size_budget="35MB", quantize="int8"), config, {})
    assert picked.quantize == "int8" and "lm_head=8" in picked.bits and plan.removed == []
    with pytest.raises(ConfigError, match="ranks the layers of a 6-layer model"):
        budget.plan_export(_cfg(tmp_path, tiny_model_dir, importance=str(_importance(tmp_path, [1], 6)), num_layers=1),
                           config, {})


def test_min_bits_keeps_low_widths_out_of_the_space(tiny_model_dir):
    table = _table(tiny_model_dir)
    space = list(budget.candidates(table, ("nf4", "int8"), {}, [(0, [])], 4, min_bits=5))
    assert {c.fmt for c in space} == {"int8"}  # nf4 has no width >= 5 for its decoder
    assert all(b >= 5 for c in space for _, b in c.bits)
    assert any(c.bit("lm_head") == 4 for c in budget.candidates(table, ("nf4",), {}, [(0, [])], 4))
    with pytest.raises(ConfigError, match="budget_min_bits: 1 is outside 2..16"):
        load_config(ExportConfig, {"input": "x", "size_budget": "4GB", "budget_min_bits": 1})


def test_budget_sizes_every_candidate_with_the_trimmed_vocabulary(tmp_path, tiny_model_dir):
    """With --trim-vocab the picker counts the rows the trim will keep: a budget that the full
    vocabulary misses at every width of bf16 is met, and the prediction is the measured size."""
    from stcompress.config import VocabConfig

    table = _table(tiny_model_dir)
    full = table.total("none", dict.fromkeys(budget.VARIED, KEEP), 4, None)
    assert full > 10e6  # the tiny model is mostly its 151k-row embedding and head
    vocab = VocabConfig(references=("builtin",))
    with pytest.raises(ConfigError, match="10MB"):
        export.run(_cfg(tmp_path, tiny_model_dir, size_budget="10MB", budget_formats=("none",)), progress=False)
    out = export.run(_cfg(tmp_path, tiny_model_dir, size_budget="10MB", budget_formats=("none",), trim_vocab=True,
                          vocab=vocab), progress=False)
    manifest = read_manifest(out)
    picked = manifest["size_budget"]["picked"]
    assert picked["vocab_size"] == manifest["vocab"]["vocab_size_after"] < 20_000
    assert picked["format"] == "none" and picked["kept_layers"] == 4
    measured = manifest["measured_bytes"]["safetensors"]
    from stcompress.metrics.efficiency import component_bytes

    # the prediction is the tensors' bytes exactly (the files add their JSON headers)
    sizes = component_bytes(out)
    assert measured <= 10e6 and picked["predicted_safetensors"] == sizes["total"] - sizes["components"]["overhead"]
