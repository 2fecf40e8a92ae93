"""A Qwen2-Audio whose text model is Gemma 3 (sliding-window and full-attention layers).

The static-cache fast path computes Qwen2's layers only; on anything else it must step aside, and
translate, prune (at a sliding and at a full layer) and reload must decode exactly like
transformers' own generate, in both transformers families (CI runs this file under each).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import transformers

from stcompress.config import DataConfig, GenerationConfig, ModelConfig, PruneConfig
from stcompress.data.example import Example
from stcompress.model import arch, static_decode
from stcompress.model.layers import remove_decoder_layers
from stcompress.model.tiny import tiny_model_cache
from stcompress.stages import prune
from stcompress.translate import Translator

LAYER_TYPES = ("sliding_attention", "full_attention", "sliding_attention", "full_attention")
# A window far shorter than the prompt (~35 tokens of text + 25 audio tokens a second).
GEMMA = dict(text_model_type="gemma3_text", text_layers=4, layer_types=LAYER_TYPES, sliding_window=8,
             rope_theta=40000.0)
EOS = {151645, 151643}


@pytest.fixture(scope="module")
def gemma_dir() -> Path:
    return tiny_model_cache(**GEMMA)


@pytest.fixture(scope="module")
def gemma(gemma_dir):
    return _plain(gemma_dir)


def _plain(directory: Path):
    model = transformers.Qwen2AudioForConditionalGeneration.from_pretrained(str(directory), dtype=torch.float32).eval()
    return model, transformers.AutoProcessor.from_pretrained(str(directory))


def _examples(speech_like, seconds=(1.5, 3.0, 0.8)):
    return [Example(id=f"g{i}", audio=speech_like(s, seed=i + 3), target_lang="de", references=("r",))
            for i, s in enumerate(seconds)]


def _generate(model, processor, examples, n=10) -> list[tuple[str, int]]:
    """transformers' own generate on processor inputs, one clip at a time (no padding involved)."""
    prompt = Translator(model, processor, progress=False).prompt
    out = []
    for ex in examples:
        inputs = processor(text=prompt.render(ex.target_lang), audio=[ex.audio], sampling_rate=16000, return_tensors="pt")
        new = model.generate(**inputs, max_new_tokens=n, do_sample=False, repetition_penalty=1.0)[0, inputs["input_ids"].shape[1]:]
        new = new.tolist()
        k = next((i + 1 for i, t in enumerate(new) if t in EOS), len(new))
        out.append((processor.tokenizer.decode(new[:k], skip_special_tokens=True).strip(), k))
    return out


def _translate(model, processor, examples, n=10, **gen) -> list[tuple[str, int]]:
    config = GenerationConfig(max_new_tokens=n, batch_size=len(examples), **gen)
    return [(h.text, h.n_tokens) for h in Translator(model, processor, generation=config, progress=False).translate(examples)]


def test_tiny_gemma_text_model_has_sliding_and_full_layers(gemma_dir):
    config = json.loads((gemma_dir / "config.json").read_text())["text_config"]
    assert config["model_type"] == "gemma3_text" and config["layer_types"] == list(LAYER_TYPES)
    assert config["sliding_window"] == 8


def test_static_cache_refuses_what_it_does_not_compute(gemma, tiny_model_dir):
    qwen, _ = _plain(tiny_model_dir)
    assert not static_decode.supported(gemma[0])
    assert static_decode.supported(qwen)
    arch.text_config(qwen).layer_types = ["sliding_attention"] + ["full_attention"] * 3
    try:
        assert not static_decode.supported(qwen)  # a sliding layer, even in a Qwen2 decoder
    finally:
        arch.text_config(qwen).layer_types = ["full_attention"] * 4


def test_translate_equals_transformers_generate(gemma, speech_like):
    model, processor = gemma
    examples = _examples(speech_like)
    expected = _generate(model, processor, examples)
    assert len({text for text, _ in expected}) > 1  # the outputs depend on the audio
    assert _translate(model, processor, examples) == expected  # batched, left-padded, static_cache on
    assert _translate(model, processor, examples, static_cache=False) == expected


@pytest.mark.parametrize("layer", [0, 1], ids=["sliding", "full"])
def test_prune_then_reload_decodes_like_generate(gemma_dir, gemma, speech_like, make_wav, tmp_path, layer):
    rows = [{"id": f"c{i}", "audio": make_wav(f"c{i}.wav", seconds=1.0 + i, seed=i).name, "text_de": "x"} for i in range(2)]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = PruneConfig(output=str(tmp_path / "pruned"), layers=(layer,), check_segments=2, check_max_new_tokens=8,
                      model=ModelConfig(path=str(gemma_dir), device="cpu", dtype="float32"),
                      data=DataConfig(dataset=str(tmp_path / "m.jsonl"), target_lang="de"))
    out = prune.run(cfg, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["reload_check"]["identical"] and manifest["layer_map"] == [i for i in range(4) if i != layer]
    saved = json.loads((out / "config.json").read_text())["text_config"]
    assert saved["layer_types"] == [t for i, t in enumerate(LAYER_TYPES) if i != layer]

    reloaded, processor = _plain(out)
    manual = copy.deepcopy(gemma[0])
    remove_decoder_layers(manual, [layer])
    examples = _examples(speech_like)
    expected = _generate(reloaded, processor, examples)
    assert _generate(manual, processor, examples) == expected  # the saved model is the pruned model
    assert _translate(reloaded, processor, examples) == expected
    assert _generate(gemma[0], processor, examples) != expected  # removing the layer changed something


def test_prune_reload_check_uses_the_generation_options(tiny_model_dir, make_wav, tmp_path, monkeypatch):
    """`--generation.static-cache false` reaches prune's reload check (it had no generation options)."""
    wav = make_wav("a.wav", seconds=1.0)
    (tmp_path / "m.jsonl").write_text(json.dumps({"id": "a", "audio": wav.name, "text_de": "x"}) + "\n")

    def refuse(*args, **kwargs):
        raise AssertionError("the static cache was used although generation.static_cache is false")

    monkeypatch.setattr(static_decode, "StaticGreedy", refuse)
    cfg = PruneConfig(output=str(tmp_path / "pruned"), layers=(1,), check_segments=1, check_max_new_tokens=4,
                      model=ModelConfig(path=str(tiny_model_dir), device="cpu", dtype="float32"),
                      data=DataConfig(dataset=str(tmp_path / "m.jsonl"), target_lang="de"),
                      generation=GenerationConfig(static_cache=False))
    manifest = json.loads((prune.run(cfg, progress=False) / "manifest.json").read_text())
    assert manifest["reload_check"]["identical"] and manifest["config"]["generation"]["static_cache"] is False
