"""Trimming a BPE tokenizer (tokenizer.json) to the tokens some texts need, exactly.

A subset of a BPE vocabulary encodes a text exactly as the full vocabulary does when it is
closed under merges: each kept token keeps every token its own merging passes through. Within
one pre-tokenized word no merge crosses the boundary between two final tokens, so the merges
inside a final token are those of encoding that token alone; with a subset closed that way, each
step's lowest-rank pair is still a kept merge, and a dropped merge never fired. Any other text still
encodes, through smaller pieces down to the alphabet, which is always kept: the 256 byte
characters of a byte-level BPE (Qwen2) or the `<0xNN>` tokens of a byte-fallback BPE (Gemma).

Used by `export --trim-vocab` (stcompress.vocab_trim) and the testbed's Gemma vocabulary
(stcompress.testbed.vocab); the demo's Qwen BPE is trimmed from tiktoken ranks by the same rule
(model.tokenizer.trim_ranks). New ids keep the old order; `old_ids[new] = old`.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterable
from typing import Any

from stcompress.errors import ModelError
from stcompress.model.tokenizer import _byte_to_unicode, merge_steps

# Always kept on top of the texts' own tokens: digits and punctuation alone and after a space
# (byte-level BPE pre-tokenizers make " ," and " (" tokens of their own), line breaks.
SAFETY_CHARS = (
    "".join(chr(c) for c in range(0x21, 0x7F) if not chr(c).isalpha())
    + "€£°§–—‘’“”„«»…·，。、；：？！（）《》【】％"
)
SAFETY_TEXTS = (
    *SAFETY_CHARS, *(" " + c for c in SAFETY_CHARS), " ", "  ", "\n", "\n\n", ".\n", "...", " ...",
)


def merge_pairs(model: dict[str, Any]) -> list[tuple[str, str]]:
    """tokenizer.json merges as pairs (tokenizers writes "a b" strings or [a, b] lists)."""
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else (m[0], m[1]) for m in model["merges"]]


def bpe_steps(word: str, ranks: dict[tuple[str, str], int], vocab: dict[str, int]) -> list[str]:
    """Every token the BPE creates while encoding `word` (characters merged by lowest rank first)."""
    parts = list(word)
    made = [p for p in parts if p in vocab]
    return made + merge_steps(parts, lambda a, b: ranks.get((a, b)))


def closure(words: Iterable[str], merges: list[tuple[str, str]], vocab: dict[str, int]) -> set[str]:
    """Every token made on the way while encoding `words` (in the BPE's own alphabet)."""
    ranks = {pair: r for r, pair in enumerate(merges)}
    keep: set[str] = set()
    for word in set(words):
        keep.update(bpe_steps(word, ranks, vocab))
    return keep


def bpe_model(full: dict[str, Any]) -> dict[str, Any]:
    model = full.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise ModelError(
            f"trim_vocab: the tokenizer is a {model.get('type')!r} model; only BPE tokenizers (tokenizer.json with "
            "vocab and merges, as Qwen2 and Gemma ship) can be trimmed; export without trim_vocab"
        )
    return model


def _is_byte_level(node: Any) -> bool:
    if isinstance(node, dict):
        return node.get("type") == "ByteLevel" or any(_is_byte_level(v) for v in node.values())
    if isinstance(node, list):
        return any(_is_byte_level(v) for v in node)
    return False


def alphabet(full: dict[str, Any]) -> set[str]:
    """The tokens every text can fall back to: byte characters, or byte-fallback `<0xNN>` tokens."""
    model = bpe_model(full)
    if _is_byte_level(full.get("pre_tokenizer")) or _is_byte_level(full.get("decoder")):
        chars = set(_byte_to_unicode().values())
    elif model.get("byte_fallback"):
        chars = {f"<0x{b:02X}>" for b in range(256)}
    else:
        raise ModelError(
            "trim_vocab: the tokenizer is neither byte-level nor byte-fallback, so a trimmed vocabulary could not "
            "encode every text; export without trim_vocab"
        )
    missing = chars - model["vocab"].keys()
    if missing:
        raise ModelError(f"trim_vocab: {len(missing)} of the 256 byte tokens are not in the vocabulary; export without trim_vocab")
    return chars


def backend(tokenizer_json: dict[str, Any]) -> Any:
    from tokenizers import Tokenizer

    return Tokenizer.from_str(json.dumps(tokenizer_json))


def used_tokens(full: dict[str, Any], texts: Iterable[str], *, full_backend: Any = None) -> set[str]:
    """The vocabulary tokens the full tokenizer encodes `texts` with (added tokens left out).
    `full_backend`: `full` already loaded as a `tokenizers.Tokenizer` (it takes seconds to build)."""
    vocab = bpe_model(full)["vocab"]
    inv = {i: t for t, i in vocab.items()}
    out: set[str] = set()
    for enc in (full_backend or backend(full)).encode_batch(list(texts), add_special_tokens=False):
        out.update(inv[i] for i in enc.ids if i in inv)
    return out


def kept_tokens(full: dict[str, Any], texts: Iterable[str], *, keep_first: int = 0, full_backend: Any = None) -> set[str]:
    """Alphabet + the tokens of `texts` and SAFETY_TEXTS + the `keep_first` lowest ids (a BPE's
    earliest, most frequent pieces), closed under merges. Added tokens are kept by `slice_tokenizer_json`."""
    model = bpe_model(full)
    vocab = model["vocab"]
    added = {t["content"] for t in full.get("added_tokens", [])}
    base = alphabet(full)
    first = [t for t, i in vocab.items() if i < keep_first and t not in added]
    used = used_tokens(full, [*texts, *SAFETY_TEXTS], full_backend=full_backend) | set(first)
    used -= added
    return base | used | closure(used - base, merge_pairs(model), vocab)


def pad_to_multiple(full: dict[str, Any], keep: set[str], ids: set[int], multiple: int) -> set[str]:
    """`keep` plus the fewest lowest-id tokens that make the row count (`ids`: every id the slice
    keeps, added tokens and extra ids included) a multiple of `multiple`, each with the tokens its
    own merging makes (so the set stays closed: kept texts still encode exactly). Tokens the merges
    alone cannot make are skipped. Returns `keep` itself when it cannot be padded (too few left)."""
    model = bpe_model(full)
    table: dict[str, int] = model["vocab"]
    need = (-len(ids)) % multiple
    if not need:
        return keep
    ranks = {pair: r for r, pair in enumerate(merge_pairs(model))}
    out, taken = set(keep), set(ids)
    for token, i in sorted(table.items(), key=lambda kv: kv[1]):
        if token in out or i in taken:
            continue
        made = set(bpe_steps(token, ranks, table))
        new = {table[t] for t in made} - taken
        if token in made and len(new) <= need:
            out |= made
            taken |= new
            need -= len(new)
            if not need:
                return out
    return keep


def slice_tokenizer_json(full: dict[str, Any], keep: set[str], *, rename: Callable[[str], str] | None = None,
                         extra_ids: Iterable[int] = (), all_added: bool = True) -> tuple[dict[str, Any], list[int]]:
    """(tokenizer.json of `keep` + `extra_ids` + every added token (`all_added`; else only the
    kept ones), old id of every new id).

    Merges kept are those whose two parts and result are kept; added tokens, the post-processor's
    and the padding's ids are renumbered. `rename` renames tokens (the testbed's chat tokens).
    """
    model = bpe_model(full)
    vocab: dict[str, int] = model["vocab"]
    rename = rename or (lambda t: t)
    unknown = keep - vocab.keys()
    if unknown:
        raise ModelError(f"trim_vocab: {len(unknown)} kept tokens are not in the vocabulary, e.g. {sorted(unknown)[0]!r}")
    added = full.get("added_tokens", [])
    old_ids = sorted({vocab[t] for t in keep} | {t["id"] for t in added if all_added} | set(extra_ids))
    new_id = {old: new for new, old in enumerate(old_ids)}
    added = [tok for tok in added if tok["id"] in new_id]
    inv = {i: t for t, i in vocab.items()}
    kept_vocab = {inv[old] for old in old_ids if old in inv}
    out = copy.deepcopy({k: v for k, v in full.items() if k != "model"})
    out["model"] = {k: v for k, v in model.items() if k not in ("vocab", "merges")}
    out["model"]["vocab"] = {rename(inv[old]): new for new, old in enumerate(old_ids) if old in inv}
    out["model"]["merges"] = [[rename(a), rename(b)] for a, b in merge_pairs(model)
                              if a in kept_vocab and b in kept_vocab and a + b in kept_vocab]
    out["added_tokens"] = [tok | {"id": new_id[tok["id"]], "content": rename(tok["content"])} for tok in added]
    _remap_post_processor(out.get("post_processor"), new_id)
    if isinstance(out.get("padding"), dict) and out["padding"].get("pad_id") in new_id:
        out["padding"]["pad_id"] = new_id[out["padding"]["pad_id"]]
    return out, old_ids


def _remap_post_processor(post: Any, new_id: dict[int, int]) -> None:
    if isinstance(post, dict):
        for spec in (post.get("special_tokens") or {}).values():
            spec["ids"] = [new_id[i] for i in spec["ids"]]
        for child in post.get("processors", []) or []:
            _remap_post_processor(child, new_id)


def inexact(full: dict[str, Any], trimmed: dict[str, Any], old_ids: list[int], texts: list[str], *,
            full_backend: Any = None) -> list[str]:
    """The texts the trimmed tokenizer encodes differently from the full one (none, when closed)."""
    a = (full_backend or backend(full)).encode_batch(texts, add_special_tokens=False)
    b = backend(trimmed).encode_batch(texts, add_special_tokens=False)
    return [t for t, x, y in zip(texts, a, b) if [old_ids[i] for i in y.ids] != x.ids]
