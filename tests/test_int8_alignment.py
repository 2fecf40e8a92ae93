"""bitsandbytes' CUDA int8 matmul fails on layers whose output features are not a multiple of 4
(benchmarks/results/bnb_int8_shapes_h200.md): trimmed vocabularies are padded to a multiple of 8,
and an int8 export that would hit it is refused by name before any weights load (export, the size
budget's picker, the sweep)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import transformers

from stcompress import budget, quantize, vocab_trim
from stcompress.config import DataConfig, ExportConfig, VocabConfig
from stcompress.data.sources import reference_texts
from stcompress.errors import ConfigError
from stcompress.model import arch, vocab
from stcompress.stages import export, sweep

ODD_ROWS = 151_681  # the tiny model's 151,680 rows + 1: not a multiple of 4


def _unaligned(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """The tiny model's files with a config claiming 151,681 vocabulary rows. Its weights do not
    match that config, so any attempt to load them fails: a refusal must come before loading."""
    out = tmp_path / "unaligned"
    shutil.copytree(tiny_model_dir, out)
    config = json.loads((out / "config.json").read_text())
    config["text_config"]["vocab_size"] = ODD_ROWS
    (out / "config.json").write_text(json.dumps(config))
    return out


def _export_cfg(tmp_path: Path, model: Path, **kw) -> ExportConfig:
    fields = {"dtype": "bfloat16", "device": "cpu", "check_segments": 2, "check_max_new_tokens": 4,
              "data": DataConfig(limit=2)}
    return ExportConfig(output=str(tmp_path / "export"), input=str(model), **(fields | kw))


def test_int8_problems_name_the_unaligned_component_and_the_fix(tiny_model_dir):
    config = transformers.AutoConfig.from_pretrained(str(tiny_model_dir))
    head8 = quantize.component_bits("int8", "lm_head=8", ("lm_head",))
    assert quantize.int8_problems("int8", head8, config) == []  # 151,680 rows: aligned
    problems = quantize.int8_problems("int8", head8, config, vocab_size=ODD_ROWS)
    assert len(problems) == 1
    assert "lm_head=8" in problems[0] and "151,681" in problems[0] and "--trim-vocab" in problems[0]
    assert "--bits lm_head=16" in problems[0]
    kept = quantize.component_bits("int8", "", ("lm_head",))  # the LM head stays bf16: nothing to refuse
    assert quantize.int8_problems("int8", kept, config, vocab_size=ODD_ROWS) == []
    nf4 = quantize.component_bits("nf4", "lm_head=4", ())
    assert quantize.int8_problems("nf4", nf4, config, vocab_size=ODD_ROWS) == []
    shapes = arch.linear_shapes(arch.meta_model(config, ODD_ROWS))
    assert quantize.int8_misfits(shapes, head8) == {"lm_head": [(name, ODD_ROWS) for name, c, _, _ in shapes
                                                                if c == "lm_head"]}


def test_export_refuses_an_unaligned_int8_head_before_loading(tmp_path, tiny_model_dir):
    model = _unaligned(tmp_path, tiny_model_dir)
    with pytest.raises(ConfigError, match=r"lm_head=8: .*151,681.*--trim-vocab"):
        export.run(_export_cfg(tmp_path, model, quantize="int8", bits="lm_head=8"), progress=False)
    assert not (tmp_path / "export").exists()
    # The same model with the head kept in bf16 gets past the check, to the loading (which fails on
    # the doctored config: proof the refusal above came first).
    with pytest.raises(Exception) as kept:
        export.run(_export_cfg(tmp_path, model, quantize="int8"), progress=False)
    assert "lm_head=8" not in str(kept.value)


def test_budget_picker_leaves_out_int8_heads_it_cannot_run(tiny_model_dir):
    config = transformers.AutoConfig.from_pretrained(str(tiny_model_dir))
    table = budget.SizeTable(config, "bfloat16", 64)
    odd = list(budget.candidates(table, ("int8",), {}, [(0, [])], 4, (ODD_ROWS,)))
    aligned = list(budget.candidates(table, ("int8",), {}, [(0, [])], 4, (ODD_ROWS + 3,)))
    assert odd and all(c.bit("lm_head") == 16 for c in odd)
    assert {c.bit("lm_head") for c in aligned} == {8, 16} and len(aligned) == 2 * len(odd)


def test_sweep_refuses_unaligned_int8_candidates_by_name(tmp_path, tiny_model_dir):
    from test_sweep import _sweep_cfg

    model = _unaligned(tmp_path, tiny_model_dir)
    cfg = _sweep_cfg(tmp_path, model, input="", importance=None, layers=(), inputs=(f"odd={model}",),
                     precisions=("bf16", "int8:lm_head=8", "int8"), trim=(False, True),
                     vocab=VocabConfig(references=("builtin:demo-train",)))
    problems = sweep.int8_problems(cfg, sweep.candidates(cfg))
    assert len(problems) == 1 and problems[0].startswith("candidate odd-L4-int8-lm_head8: quantize int8 with lm_head=8")
    with pytest.raises(ConfigError, match="candidate odd-L4-int8-lm_head8: "):
        sweep.run(cfg, progress=False)
    assert not (tmp_path / "run").exists()


def test_trimmed_rows_are_a_multiple_of_8_and_still_exact(qwen_tokenizer):
    texts = reference_texts(DataConfig(target_lang="de"))[:40]
    full = json.loads(qwen_tokenizer.backend_tokenizer.to_str())
    keep = vocab.kept_tokens(full, texts)
    _, unpadded = vocab.slice_tokenizer_json(full, keep)
    trimmed, old_ids = vocab_trim.plan(qwen_tokenizer, texts)
    assert len(old_ids) % vocab_trim.ROW_MULTIPLE == 0
    assert set(unpadded) <= set(old_ids) and len(old_ids) - len(unpadded) < vocab_trim.ROW_MULTIPLE
    names = set(trimmed["model"]["vocab"])
    ranks = {pair: r for r, pair in enumerate(vocab.merge_pairs(full["model"]))}
    for token in names:  # still closed under merges
        assert set(vocab.bpe_steps(token, ranks, full["model"]["vocab"])) <= names, token
    assert vocab.inexact(full, trimmed, old_ids, texts) == []
    for rows in range(len(unpadded), len(unpadded) + 9):  # every remainder pads to the next multiple
        ids = set(unpadded) | set(range(10**6, 10**6 + rows - len(unpadded)))
        padded = vocab.pad_to_multiple(full, keep, ids, 8)
        added = {full["model"]["vocab"][t] for t in padded} - ids
        assert (len(ids) + len(added)) % 8 == 0 and len(added) == (-len(ids)) % 8


def test_padding_a_byte_fallback_bpe_keeps_it_exact():
    from test_testbed import TEXTS, _tiny_bpe_json

    full = _tiny_bpe_json()
    keep = vocab.kept_tokens(full, TEXTS[:2])
    _, ids = vocab.slice_tokenizer_json(full, keep)
    padded = vocab.pad_to_multiple(full, keep, set(ids), 16)
    trimmed, old_ids = vocab.slice_tokenizer_json(full, padded)
    assert len(old_ids) % 16 == 0 and len(old_ids) > len(ids)
    assert vocab.inexact(full, trimmed, old_ids, TEXTS[:2]) == []
    everything = set(full["model"]["vocab"])  # nothing left to pad with: unchanged, never a partial pad
    assert vocab.pad_to_multiple(full, everything, set(range(len(everything) + 1)), 10**6) == everything
