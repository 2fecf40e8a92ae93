"""The offline demo's task: 120 short English sentences, their German and Chinese translations, and
synthesised English speech (see data/demo/README.md for voices, splits and how it was made)."""

from __future__ import annotations

import json
from pathlib import Path

from stcompress.config import PromptConfig
from stcompress.languages import language_name

DEMO_DIR = Path(__file__).resolve().parent / "demo"
DEMO_LANGS = ("de", "zh")


def sentences() -> list[dict[str, str]]:
    """Rows of sentences.jsonl: sentence id, split (train / test), text_en, text_de, text_zh."""
    lines = (DEMO_DIR / "sentences.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def vocabulary_texts() -> list[str]:
    """Every text the demo model reads or writes: the sentences and the default prompts. Its
    trimmed vocabulary (`tokenizer.trim_ranks`) encodes these exactly like the full Qwen one."""
    prompt = PromptConfig()
    texts = [prompt.system, "You are a helpful assistant.", "system\n", "user\n", "assistant\n", "Audio 1: "]
    texts += [prompt.instruction.format(language=language_name(lang)) for lang in DEMO_LANGS]
    for row in sentences():
        texts += [row["text_en"], *(row[f"text_{lang}"] for lang in DEMO_LANGS)]
    return texts
