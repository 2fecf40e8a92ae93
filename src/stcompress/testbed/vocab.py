"""A trimmed Gemma tokenizer: the testbed's texts encode exactly as with the full 262k vocabulary.

Gemma's embedding (262,144 x 640, tied to the LM head) is 63% of the 270M model; the testbed needs a
few ten thousand of those rows. Gemma's tokenizer is a byte-fallback BPE (`tokenizer.json`:
vocab + merges), so a subset stays exact when it is closed under merges: every kept token keeps
the pair(s) that build it, recursively (stcompress.model.vocab, shared with `export --trim-vocab`). Encoding a kept text then takes the same merge steps (each
step's lowest-rank pair is a kept merge, and a dropped merge never fired), and any other text still
encodes, through smaller pieces or the 256 byte tokens.

Chat tokens are renamed to Qwen2-Audio's names so the product's prompt path (Qwen2-Audio chat
template, `<|AUDIO|>` placeholder, `<|im_end|>` end of turn) runs unchanged on Gemma's own rows:
`<start_of_turn>` -> `<|im_start|>`, `<end_of_turn>` -> `<|im_end|>`, and three of Gemma's unused
tokens become `<|AUDIO|>`, `<|audio_bos|>`, `<|audio_eos|>`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from stcompress.model.vocab import bpe_steps, closure, merge_pairs, slice_tokenizer_json

__all__ = ["RENAME", "BASE_SPECIALS", "SAFETY_CHARS", "bpe_steps", "closure", "words", "trim_tokenizer_json"]

RENAME = {
    "<start_of_turn>": "<|im_start|>",
    "<end_of_turn>": "<|im_end|>",
    "<unused0>": "<|AUDIO|>",
    "<unused1>": "<|audio_bos|>",
    "<unused2>": "<|audio_eos|>",
}
BASE_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")
# Always kept, whatever the texts: digits, ASCII, German letters, common punctuation (also CJK).
SAFETY_CHARS = (
    "".join(chr(c) for c in range(0x20, 0x7F)) + "äöüÄÖÜßéèàâçêëïîôûñ€£°§–—‘’“”„«»…·"
    + "，。、；：？！“”‘’（）《》【】—…·％"
)


def words(texts: Iterable[str]) -> list[str]:
    """What Gemma's BPE sees: the whole text, spaces replaced by ▁ (no pre-tokenizer split)."""
    return [t.replace(" ", "▁") for t in texts] + [c for c in SAFETY_CHARS] + ["▁" + c for c in SAFETY_CHARS]


def trim_tokenizer_json(full: dict[str, Any], texts: Iterable[str], *, first_ids: int = 0) -> tuple[dict[str, Any], list[int]]:
    """(trimmed tokenizer.json, old id of every new id). New ids follow the old order.

    Kept: the base specials, the renamed chat/audio tokens, the 256 byte tokens `<0xNN>`, every
    token made while encoding `texts` and the safety characters, and the ids below `first_ids`
    (Gemma's most frequent pieces: a margin for unseen text) with the tokens they are made from.
    Merges are those whose parts and result are all kept.
    """
    model = full["model"]
    vocab: dict[str, int] = model["vocab"]
    merges = merge_pairs(model)
    inv = {i: t for t, i in vocab.items()}
    base = set(BASE_SPECIALS) | set(RENAME) | {f"<0x{b:02X}>" for b in range(256)}
    margin = [inv[i] for i in range(min(first_ids, len(inv))) if inv[i] not in base]
    keep = base | closure([*words(texts), *margin], merges, vocab)
    out, old_ids = slice_tokenizer_json(full, keep, rename=lambda t: RENAME.get(t, t), all_added=False)
    renamed = set(RENAME.values())
    out["added_tokens"] = [tok | {"special": True} if tok["content"] in renamed else tok for tok in out["added_tokens"]]
    return out, old_ids

