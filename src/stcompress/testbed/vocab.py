"""A trimmed Gemma tokenizer: the testbed's texts encode exactly as with the full 262k vocabulary.

Gemma's embedding (262,144 x 640, tied to the LM head) is 63% of the 270M model; the testbed needs a
few ten thousand of those rows. Gemma's tokenizer is a byte-fallback BPE (`tokenizer.json`:
vocab + merges), so a subset stays exact when it is closed under merges: every kept token keeps
the pair(s) that build it, recursively. Encoding a kept text then takes the same merge steps (each
step's lowest-rank pair is a kept merge, and a dropped merge never fired), and any other text still
encodes, through smaller pieces or the 256 byte tokens.

Chat tokens are renamed to Qwen2-Audio's names so the product's prompt path (Qwen2-Audio chat
template, `<|AUDIO|>` placeholder, `<|im_end|>` end of turn) runs unchanged on Gemma's own rows:
`<start_of_turn>` -> `<|im_start|>`, `<end_of_turn>` -> `<|im_end|>`, and three of Gemma's unused
tokens become `<|AUDIO|>`, `<|audio_bos|>`, `<|audio_eos|>`.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from stcompress.model.tokenizer import merge_steps

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


def _merge_pairs(model: dict[str, Any]) -> list[tuple[str, str]]:
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else (m[0], m[1]) for m in model["merges"]]


def bpe_steps(word: str, ranks: dict[tuple[str, str], int], vocab: dict[str, int]) -> list[str]:
    """Every token the BPE creates while encoding `word` (characters merged by lowest rank first)."""
    parts = list(word)
    made = [p for p in parts if p in vocab]
    return made + merge_steps(parts, lambda a, b: ranks.get((a, b)))


def closure(words: Iterable[str], merges: list[tuple[str, str]], vocab: dict[str, int]) -> set[str]:
    """Every token made on the way while encoding `words` (normalised: spaces as ▁)."""
    ranks = {pair: r for r, pair in enumerate(merges)}
    keep: set[str] = set()
    for word in set(words):
        keep.update(bpe_steps(word, ranks, vocab))
    return keep


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
    merges = _merge_pairs(model)
    inv = {i: t for t, i in vocab.items()}
    base = set(BASE_SPECIALS) | set(RENAME) | {f"<0x{b:02X}>" for b in range(256)}
    margin = [inv[i] for i in range(min(first_ids, len(inv))) if inv[i] not in base]
    keep = base | closure([*words(texts), *margin], merges, vocab)
    old_ids = sorted(vocab[t] for t in keep)
    new_id = {old: new for new, old in enumerate(old_ids)}
    rename = lambda t: RENAME.get(t, t)  # noqa: E731
    out = copy.deepcopy({k: v for k, v in full.items() if k != "model"})
    out["model"] = {k: v for k, v in model.items() if k not in ("vocab", "merges")}
    out["model"]["vocab"] = {rename(inv[old]): new for new, old in enumerate(old_ids)}
    out["model"]["merges"] = [[a, b] for a, b in merges if a in keep and b in keep and a + b in keep]
    added = []
    for tok in full.get("added_tokens", []):
        if tok["id"] in new_id:
            added.append(tok | {"id": new_id[tok["id"]], "content": rename(tok["content"]), "special": True
                                if tok["content"] in RENAME else tok["special"]})
    out["added_tokens"] = added
    _remap_post_processor(out.get("post_processor"), new_id)
    return out, old_ids


def _remap_post_processor(post: Any, new_id: dict[int, int]) -> None:
    if isinstance(post, dict):
        for spec in (post.get("special_tokens") or {}).values():
            spec["ids"] = [new_id[i] for i in spec["ids"]]
        for child in post.get("processors", []) or []:
            _remap_post_processor(child, new_id)
