"""`export --trim-vocab`: the kept set is closed under merges, the sliced model decodes like the
full one on kept tokens and cannot emit others, the export reloads with plain from_pretrained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from packaging.version import Version

from stcompress.artifacts import read_manifest
from stcompress.config import DataConfig, ExportConfig, ModelConfig, VocabConfig, load_config
from stcompress.data.sources import load_examples, reference_texts
from stcompress.errors import ConfigError, ModelError
from stcompress.metrics.efficiency import component_bytes
from stcompress.model import arch, vocab
from stcompress.model.load import load_model
from stcompress.model.tokenizer import _byte_to_unicode
from stcompress.prompt import PromptBuilder
from stcompress.quantize import component_bits
from stcompress.sizes import predict
from stcompress.stages import export
from stcompress import vocab_trim

TF5 = Version(transformers.__version__) >= Version("5")
UNSEEN = ["Völlig neue Wörter: Quantenchromodynamik, 1234,5 €!", "完全没见过的中文句子。", "emoji 🙂 ζ\ttab"]
DISTILL = Path(__file__).parents[1] / "benchmarks/testbed/results/de-run1/distill"  # a real distill output


def _loaded(path: Path):
    return load_model(ModelConfig(path=str(path), dtype="float32", device="cpu"))


def _examples(n: int = 2):
    return load_examples(DataConfig(limit=n)).examples


def _prompt(processor) -> str:
    return PromptBuilder(processor).render("de")


def _generate(model, processor, examples, max_new_tokens: int = 10) -> list[list[int]]:
    """Greedy new tokens through plain transformers (processor + generate), one clip at a time."""
    out = []
    for ex in examples:
        inputs = processor(text=_prompt(processor), audio=[ex.audio], sampling_rate=16000, return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, min_new_tokens=max_new_tokens)
        out.append(ids[0, inputs["input_ids"].shape[1]:].tolist())
    return out


def test_kept_set_is_closed_under_merges_and_encodes_kept_texts_exactly(qwen_tokenizer):
    texts = reference_texts(DataConfig(target_lang="de")) + reference_texts(DataConfig(target_lang="zh"))
    full = json.loads(qwen_tokenizer.backend_tokenizer.to_str())
    trimmed, old_ids = vocab_trim.plan(qwen_tokenizer, texts)
    assert len(old_ids) < len(qwen_tokenizer) // 50 and old_ids == sorted(old_ids)
    names = set(trimmed["model"]["vocab"])
    assert set(_byte_to_unicode().values()) <= names  # the 256 byte tokens: any text still encodes
    to_str = _byte_to_unicode()
    assert {"".join(to_str[b] for b in t.encode()) for t in ("0", "9", ",", " ,", "?", " (", "。")} <= names
    added = {t["content"]: t["id"] for t in trimmed["added_tokens"]}
    assert set(added) == {"<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"}
    # closed: every token made on the way to a kept token is kept
    ranks = {pair: r for r, pair in enumerate(vocab.merge_pairs(full["model"]))}
    for token in names:
        assert set(vocab.bpe_steps(token, ranks, full["model"]["vocab"])) <= names, token
    small = vocab.backend(trimmed)
    for text in texts:
        assert [old_ids[i] for i in small.encode(text, add_special_tokens=False).ids] == qwen_tokenizer.encode(
            text, add_special_tokens=False)
    for text in UNSEEN:  # not kept: still encodes and decodes losslessly
        assert small.decode(small.encode(text, add_special_tokens=False).ids) == text
    wider, wider_ids = vocab_trim.plan(qwen_tokenizer, texts, keep_first=2000)
    assert set(range(2000)) <= set(wider_ids) and len(wider_ids) > len(old_ids)


def test_byte_fallback_bpe_trims_exactly_too():
    """Gemma-style BPE (no pre-tokenizer, spaces as ▁, `<0xNN>` byte fallback): the same rule."""
    from test_testbed import TEXTS, _tiny_bpe_json

    full = _tiny_bpe_json()
    assert vocab.alphabet(full) == {f"<0x{b:02X}>" for b in range(256)}
    keep = vocab.kept_tokens(full, TEXTS[:2])
    trimmed, old_ids = vocab.slice_tokenizer_json(full, keep)
    assert len(old_ids) < len(full["model"]["vocab"])
    assert vocab.inexact(full, trimmed, old_ids, TEXTS[:2]) == []
    small = vocab.backend(trimmed)
    for text in TEXTS[2:] + UNSEEN:
        assert small.decode(small.encode(text).ids) == text


def test_trimmed_model_decodes_like_the_full_one_on_kept_tokens_and_never_outside(tiny_model_dir):
    full = _loaded(tiny_model_dir)
    examples = _examples(2)
    before = _generate(full.model, full.processor, examples)
    texts = reference_texts(DataConfig(target_lang="de"))[:4] + [_prompt(full.processor)]
    # The untrimmed model's greedy tokens are kept: greedy decoding must be identical.
    kept = _loaded(tiny_model_dir)
    outputs = tuple(sorted({i for row in before for i in row}))
    trimmed, old_ids = vocab_trim.plan(kept.processor.tokenizer, texts, extra_ids=outputs)
    kept.processor = vocab_trim.trimmed_processor(kept.processor, trimmed, old_ids)
    arch.slice_vocab(kept.model, old_ids)
    after = _generate(kept.model, kept.processor, examples)
    n = len(old_ids)
    assert all(0 <= i < n for row in after for i in row)
    assert [[old_ids[i] for i in row] for row in after] == before
    decode = lambda p, rows: [p.tokenizer.decode(r, skip_special_tokens=True) for r in rows]  # noqa: E731
    assert decode(kept.processor, after) == decode(full.processor, before)
    # Outputs not kept (texts only): still only kept ids, and (documented) the text can differ.
    record = vocab_trim.trim_model(full, texts)
    other = _generate(full.model, full.processor, examples)
    assert record["vocab_size_after"] == arch.vocab_size(full.model) < n
    logits_rows = arch.lm_head(full.model).weight.shape[0]
    assert logits_rows == record["kept_tokens"] and all(0 <= i < logits_rows for row in other for i in row)
    assert other != after


def test_tied_head_stays_tied_and_config_ids_move():
    from stcompress.model.tiny import TinySpec, tiny_config

    config = tiny_config(TinySpec(text_model_type="gemma3_text", text_layers=2), vocab_size=300,
                         ids={"pad": 0, "eos": 1, "audio": 2})
    config.text_config.tie_word_embeddings = config.tie_word_embeddings = True
    model = transformers.Qwen2AudioForConditionalGeneration(config).eval()
    head, emb = arch.lm_head(model), arch.embed_tokens(model)
    head.weight = emb.weight  # 5.x's Qwen2-Audio declares no tied weights: tie by hand in memory
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = [1, 0], 0
    full = emb.weight.detach().clone()
    with pytest.raises(ModelError, match="audio_token_index 2 is not among the kept tokens"):
        arch.slice_vocab(model, [0, 1, 5, 7])
    old_ids = [0, 1, 2, *range(10, 300, 7)]
    arch.slice_vocab(model, old_ids)
    assert arch.tied_head(model) and arch.vocab_size(model) == len(old_ids) == model.config.text_config.vocab_size
    assert torch.equal(arch.embed_tokens(model).weight, full[old_ids])
    assert model.config.audio_token_index == 2 and model.generation_config.eos_token_id == [1, 0]
    hidden = torch.randn(3, 64)
    assert torch.equal(arch.lm_head(model)(hidden), hidden @ full[old_ids].T)


@pytest.mark.skipif(TF5, reason="transformers 5.x's Qwen2-Audio declares no tied weights; 4.57 saves and reloads a tie")
def test_tied_head_survives_save_and_reload(tmp_path):
    from stcompress.model.tiny import TinySpec, tiny_config

    config = tiny_config(TinySpec(text_model_type="gemma3_text", text_layers=2), vocab_size=300,
                         ids={"pad": 0, "eos": 1, "audio": 2})
    config.text_config.tie_word_embeddings = config.tie_word_embeddings = True
    model = transformers.Qwen2AudioForConditionalGeneration(config).eval()
    assert arch.tied_head(model)
    arch.slice_vocab(model, [0, 1, 2, *range(10, 300, 7)])
    model.save_pretrained(str(tmp_path))
    reloaded = transformers.Qwen2AudioForConditionalGeneration.from_pretrained(str(tmp_path))
    assert arch.tied_head(reloaded) and arch.vocab_size(reloaded) == arch.vocab_size(model)
    assert torch.equal(arch.embed_tokens(reloaded).weight, arch.embed_tokens(model).weight)


def _cfg(tmp_path: Path, input: Path, name: str, **kw) -> ExportConfig:
    fields = {"dtype": "float32", "device": "cpu", "check_segments": 2, "check_max_new_tokens": 6,
              "data": DataConfig(limit=2), "trim_vocab": True, "vocab": VocabConfig(references=("builtin",))}
    return ExportConfig(output=str(tmp_path / name), input=str(input), **(fields | kw))


def test_trimmed_export_reloads_and_decodes_like_the_trimmed_model(tmp_path, tiny_model_dir):
    out = export.run(_cfg(tmp_path, tiny_model_dir, "trimmed"), progress=False)
    manifest = read_manifest(out)
    trim = manifest["vocab"]
    assert manifest["reload_check"]["identical"]
    reloaded = transformers.Qwen2AudioForConditionalGeneration.from_pretrained(str(out)).eval()
    processor = transformers.AutoProcessor.from_pretrained(str(out))
    assert arch.vocab_size(reloaded) == reloaded.config.text_config.vocab_size == trim["kept_tokens"] < 2000
    assert trim["vocab_size_before"] == 151680 and trim["source"] == "vocab options"
    assert trim["parameters"]["after"] == sum(p.numel() for p in reloaded.parameters()) < trim["parameters"]["before"]
    assert processor.tokenizer.convert_tokens_to_ids("<|AUDIO|>") == reloaded.config.audio_token_index
    assert reloaded.generation_config.eos_token_id == [processor.tokenizer.convert_tokens_to_ids("<|im_end|>"),
                                                       processor.tokenizer.pad_token_id]
    # the in-memory trimmed model, built the same way: the reload decodes like it
    memory = _loaded(tiny_model_dir)
    full_tokenizer = memory.processor.tokenizer
    texts = reference_texts(DataConfig())
    vocab_trim.trim_model(memory, [*texts, _prompt(memory.processor)])
    examples = _examples(2)
    assert _generate(reloaded, processor, examples) == _generate(memory.model, memory.processor, examples)
    old_ids = [full_tokenizer.convert_tokens_to_ids(processor.tokenizer.convert_ids_to_tokens(i))
               for i in range(len(processor.tokenizer))]
    for text in texts:  # round trip of the kept texts through the saved tokenizer
        ids = processor.tokenizer.encode(text, add_special_tokens=False)
        assert [old_ids[i] for i in ids] == full_tokenizer.encode(text, add_special_tokens=False)
        assert processor.tokenizer.decode(ids) == text
    card = (out / "README.md").read_text()
    assert "## Vocabulary" in card and f"Trimmed to **{trim['kept_tokens']:,}** of 151,680" in card
    assert trim["bytes"]["after"] == component_bytes(out)["total"] < trim["bytes"]["before_predicted"] / 20


def test_trim_then_int8_and_sizes_predict_the_trimmed_vocab(tmp_path, tiny_model_dir):
    out = export.run(_cfg(tmp_path, tiny_model_dir, "int8", dtype="bfloat16", quantize="int8", keep_unquantized=()),
                     progress=False)
    manifest = read_manifest(out)
    assert manifest["reload_check"]["identical"] and manifest["vocab"]["source"] == "vocab options"
    reloaded = transformers.Qwen2AudioForConditionalGeneration.from_pretrained(str(out))
    assert type(arch.lm_head(reloaded)).__name__ == "Linear8bitLt"
    assert arch.lm_head(reloaded).weight.shape[0] == arch.vocab_size(reloaded) == manifest["vocab"]["kept_tokens"]
    config = transformers.AutoConfig.from_pretrained(str(out))
    chosen = component_bits("int8", "", ())
    measured = component_bytes(out)["components"]
    predicted = predict(config, "int8", chosen, "bfloat16")
    assert {c: predicted[c] for c in arch.COMPONENTS} == {c: measured[c] for c in arch.COMPONENTS}
    untrimmed = predict(config, "int8", chosen, "bfloat16", vocab_size=151680)
    assert untrimmed["total"] == manifest["vocab"]["bytes"]["before_predicted"] > 10 * predicted["total"]
    assert untrimmed["decoder_layers"] == predicted["decoder_layers"]


@pytest.mark.skipif(TF5, reason="transformers 5.x cannot write or reload HQQ checkpoints (refused by export)")
def test_trim_then_hqq_with_bits_per_component(tmp_path, tiny_model_dir):
    # float32: 4.57's HQQ loader computes in float32, so a bf16 export's reload check compares bf16 with
    # float32 arithmetic (the untrimmed tiny model with these bits disagrees too: token agreement 0.83)
    DTYPE = "float32"
    bits = "decoder_layers=3,lm_head=8"
    out = export.run(_cfg(tmp_path, tiny_model_dir, "hqq", dtype=DTYPE, quantize="hqq", bits=bits), progress=False)
    manifest = read_manifest(out)
    assert manifest["reload_check"]["identical"]
    reloaded = transformers.Qwen2AudioForConditionalGeneration.from_pretrained(str(out), dtype=torch.float32)
    head = arch.lm_head(reloaded)
    assert type(head).__name__ == "HQQLinear" and head.meta["nbits"] == 8
    assert head.meta["shape"][0] == arch.vocab_size(reloaded) == manifest["vocab"]["kept_tokens"]
    config = transformers.AutoConfig.from_pretrained(str(out))
    predicted = predict(config, "hqq", component_bits("hqq", bits, ("lm_head",)), DTYPE)
    measured = component_bytes(out)["components"]
    assert {c: predicted[c] for c in arch.COMPONENTS} == {c: measured[c] for c in arch.COMPONENTS}


def test_kept_texts_default_to_the_training_data_upstream_and_bad_input_fails_early(tmp_path, tiny_model_dir, capsys):
    finetune = {"stage": "finetune", "config": {"datasets": [
        {"data": {"dataset": "builtin", "target_lang": "de"}}, {"distilled": str(DISTILL)}]}}
    found = vocab_trim.kept_texts(VocabConfig(), [finetune])
    assert found.origin == "training data upstream"
    assert [s["kind"] for s in found.sources] == ["references", "distilled"]
    hypotheses = [json.loads(line)["hypothesis"] for line in (DISTILL / "hypotheses.jsonl").read_text().splitlines()]
    assert set(reference_texts(DataConfig())) | set(hypotheses) <= set(found.texts)
    assert len(found.texts) == len(set(found.texts))
    with pytest.raises(ConfigError, match="no finetune manifest upstream of the input records its training data"):
        export.run(_cfg(tmp_path, tiny_model_dir, "none", vocab=VocabConfig()), progress=False)
    with pytest.raises(ConfigError, match=r"vocab \(vocab.references\).*nope.jsonl"):
        export.run(_cfg(tmp_path, tiny_model_dir, "bad", vocab=VocabConfig(references=(str(tmp_path / "nope.jsonl"),))),
                   progress=False)
    from stcompress import cli

    code = cli.main(["export", "--input", str(tiny_model_dir), "--trim-vocab", "--vocab.distilled", str(tmp_path / "kd"),
                     "--output", str(tmp_path / "cli"), "-q"])
    assert code == 2 and f"vocab.distilled: {tmp_path / 'kd'} does not exist" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="vocab: set only with trim_vocab"):
        load_config(ExportConfig, {"input": "x", "vocab": {"distilled": "d"}})
    assert not any((tmp_path / n).exists() for n in ("none", "bad", "cli"))
