"""The tiny model follows the real Qwen2-Audio token path and loads with plain transformers."""

from __future__ import annotations

import json

import pytest
import torch

from stcompress.errors import ModelError
from stcompress.model.tiny import TINY_VOCAB_SIZE, build_tiny_model, resolve_builtin
from stcompress.model.tokenizer import QWEN2_AUDIO_CHAT_TEMPLATE, QWEN2_PRETOKENIZE_REGEX, SPECIAL_TOKENS, load_ranks

PAPER_MESSAGES = [
    {"role": "system", "content": "You are a professional translator."},
    {
        "role": "user",
        "content": [
            {"type": "audio", "audio_url": "x.wav"},
            {"type": "text", "text": "Translate the English speech into German:"},
        ],
    },
]
PAPER_PROMPT = (
    "<|im_start|>system\nYou are a professional translator.<|im_end|>\n"
    "<|im_start|>user\nAudio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
    "Translate the English speech into German:<|im_end|>\n"
    "<|im_start|>assistant\n"
)
AUDIO_ID = SPECIAL_TOKENS["<|AUDIO|>"]
TEXTS = [
    "Hello world! The quick brown fox jumps over 1234 lazy dogs.\n\n  Tabs\tand   spaces  ",
    "Übersetzen Sie die englische Sprache ins Deutsche: Straße, Größe, ÄÖÜäöüß — 3,14 €.",
    "将英语语音翻译成中文：你好，世界！我们在2025年参加了IWSLT。",
    "emoji 🤖🎉 and code: def f(x): return x**2  # it's done, we'll see",
]


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

    model = Qwen2AudioForConditionalGeneration.from_pretrained(str(tiny_model_dir)).eval()
    processor = AutoProcessor.from_pretrained(str(tiny_model_dir))
    return model, processor


def _inputs(processor, audio):
    text = processor.apply_chat_template(PAPER_MESSAGES, add_generation_prompt=True, tokenize=False)
    return processor(text=text, audio=[audio], sampling_rate=16000, return_tensors="pt")


def _greedy(model, inputs, n=8) -> list[int]:
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def test_loads_with_plain_from_pretrained(loaded, tiny_model_dir):
    model, processor = loaded
    assert type(model).__name__ == "Qwen2AudioForConditionalGeneration"
    assert type(processor).__name__ == "Qwen2AudioProcessor"
    assert type(processor.feature_extractor).__name__ == "WhisperFeatureExtractor"
    assert processor.feature_extractor.feature_size == model.config.audio_config.num_mel_bins == 80
    assert model.config.audio_token_index == model.config.audio_token_id == AUDIO_ID
    assert model.config.text_config.vocab_size == TINY_VOCAB_SIZE >= len(processor.tokenizer)
    assert model.config.audio_config.max_source_positions == 1500
    head, embed = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert head.data_ptr() != embed.data_ptr() and not torch.equal(head, embed)  # untied, like the 7B
    assert model.generation_config.eos_token_id == [151645, 151643]
    assert model.generation_config.pad_token_id == 151643


def test_writes_files_both_transformers_majors_read(tiny_model_dir):
    # 4.5x reads the feature extractor from preprocessor_config.json and wants a dict (not a
    # list) under extra_special_tokens; 5.x reads either layout.
    assert (tiny_model_dir / "preprocessor_config.json").is_file()
    assert (tiny_model_dir / "model.safetensors").is_file()
    config = json.loads((tiny_model_dir / "tokenizer_config.json").read_text())
    assert not isinstance(config.get("extra_special_tokens"), list)


def test_chat_template_renders_paper_prompt(loaded):
    _, processor = loaded
    rendered = processor.apply_chat_template(PAPER_MESSAGES, add_generation_prompt=True, tokenize=False)
    assert rendered == PAPER_PROMPT


def test_chat_template_default_system_and_audio_count(loaded):
    _, processor = loaded
    messages = [{"role": "user", "content": [{"type": "audio", "audio_url": "a.wav"}, {"type": "audio", "audio_url": "b.wav"}]}]
    rendered = processor.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    assert rendered.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    assert "Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\nAudio 2: " in rendered
    assert processor.chat_template == QWEN2_AUDIO_CHAT_TEMPLATE


@pytest.mark.parametrize(("seconds", "expected"), [(8.0, 200), (3.3, 82), (30.0, 750), (40.0, 750)])
def test_processor_expands_audio_placeholder(loaded, speech_like, seconds, expected):
    _, processor = loaded
    inputs = _inputs(processor, speech_like(seconds, seed=1))
    frames = int(inputs["feature_attention_mask"].sum())
    assert ((frames - 1) // 2 + 1 - 2) // 2 + 1 == expected  # clips over 30 s are truncated
    ids = inputs["input_ids"][0].tolist()
    assert ids.count(AUDIO_ID) == expected
    first = ids.index(AUDIO_ID)
    assert ids[first - 1] == SPECIAL_TOKENS["<|audio_bos|>"]
    assert ids[first + expected] == SPECIAL_TOKENS["<|audio_eos|>"]
    assert tuple(inputs["input_features"].shape) == (1, 80, 3000)  # always padded to 30 s


def test_generate_runs_and_decodes(loaded, speech_like):
    model, processor = loaded
    new = _greedy(model, _inputs(processor, speech_like(8.0, seed=0)))
    assert 0 < len(new) <= 8 and max(new) < len(processor.tokenizer)
    text = processor.tokenizer.decode(new, skip_special_tokens=True)
    assert isinstance(text, str)
    assert processor.batch_decode([new], skip_special_tokens=True) == [text]


def test_greedy_output_depends_on_audio(loaded, speech_like):
    model, processor = loaded
    outputs = {tuple(_greedy(model, _inputs(processor, speech_like(6.0, seed=s)))) for s in range(3)}
    assert len(outputs) == 3


def test_tokenizer_encodes_like_tiktoken(qwen_tokenizer):
    tiktoken = pytest.importorskip("tiktoken")
    enc = tiktoken.Encoding(
        "qwen2", pat_str=QWEN2_PRETOKENIZE_REGEX, mergeable_ranks=load_ranks(), special_tokens=SPECIAL_TOKENS
    )
    for text in [*TEXTS, PAPER_PROMPT]:
        ids = qwen_tokenizer.encode(text, add_special_tokens=False)
        assert ids == enc.encode(text, allowed_special="all"), text
        assert qwen_tokenizer.decode(ids) == text


def test_tokenizer_special_tokens(qwen_tokenizer):
    assert len(qwen_tokenizer) == 151649
    assert {t: qwen_tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS} == SPECIAL_TOKENS
    assert qwen_tokenizer.pad_token_id == 151643 and qwen_tokenizer.eos_token_id == 151645
    assert qwen_tokenizer.bos_token is None
    ids = qwen_tokenizer.encode("<|im_start|>user\nHallo<|im_end|>", add_special_tokens=False)
    assert ids[0] == 151644 and ids[-1] == 151645
    assert qwen_tokenizer.decode(ids, skip_special_tokens=True) == "user\nHallo"


def test_builtin_is_the_default_tiny_model(tiny_model_dir):
    assert resolve_builtin("tiny-random") == tiny_model_dir
    with pytest.raises(ModelError, match="builtin:tiny-random"):
        resolve_builtin("no-such-model")


def test_build_refuses_existing_dir(tmp_path):
    with pytest.raises(ModelError, match="already exists"):
        build_tiny_model(tmp_path)
