"""The testbed's texts: human EN->DE and EN->ZH sentence pairs, deduplicated and split once.

Sources (registries only): Debian `trans-de-en` (the Ding dictionary, GPL-2+) has ~10.8k
English/German example *sentences* among its entries; PyPI `hsk-sentences-audio` (data
CC-BY-SA-4.0) has 4,354 Chinese sentences with English translations. The English side is later
spoken by TTS voices (`speech.py`), so the task is speech translation with human references.

Splits are fixed by a hash of each pair's normalised text, not by file order or a seed, so a
rebuild from a newer package version keeps every surviving sentence in its split. Near
duplicates (same words after lower-casing and dropping punctuation, on either side) form one
group and land in one split, so test never holds a paraphrase-free copy of a training sentence.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from stcompress.errors import DataError

DING_PATH = Path("/usr/share/trans/de-en")
SPLIT_ORDER = ("test", "dev", "train")

_SENTENCE_END = re.compile(r"[.!?。！？]$")
_ANNOTATION = re.compile(r"[;{}\[\]<>/~()]")  # dictionary markup: genders, labels, alternatives


@dataclass(frozen=True, order=True)
class Pair:
    """One human translation pair; `key` is its near-duplicate signature."""

    source: str  # "ding" or "hsk"
    source_id: str
    text_en: str
    text_tgt: str


def normalise(text: str) -> str:
    """Lower-case letters and digits only, single spaces: 'It's fine!' == 'its fine'."""
    text = unicodedata.normalize("NFKC", text).lower().replace("’", "'")
    text = re.sub(r"[^\w\s]|_", "", text)
    return " ".join(text.split())


def ding_pairs(path: Path = DING_PATH, min_words: int = 6) -> list[Pair]:
    """English/German example sentences of the Ding dictionary (entries that are sentences).

    A line is `de | de ... :: en | en ...` with aligned `|` alternatives; a pair is kept when both
    sides end like a sentence, carry no dictionary markup and the English has >= min_words words.
    """
    if not path.is_file():
        raise DataError(f"testbed: {path} not found; apt-get install trans-de-en (Debian, GPL-2+)")
    out: list[Pair] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.startswith("#") or " :: " not in line:
            continue
        de, en = line.split(" :: ", 1)
        des, ens = de.split(" | "), en.split(" | ")
        if len(des) != len(ens):
            continue
        for j, (d, e) in enumerate(zip(des, ens)):
            d, e = d.strip(), e.strip()
            if not (_SENTENCE_END.search(d) and _SENTENCE_END.search(e)) or _ANNOTATION.search(d + e):
                continue
            if len(e.split()) >= min_words and len(d.split()) >= min_words - 1:
                out.append(Pair("ding", f"{n}.{j}", e, d))
    return out


def hsk_pairs(path: Path | None = None) -> list[Pair]:
    """Chinese sentences of `hsk-sentences-audio` with their English translations."""
    if path is None:
        try:
            from importlib.resources import files

            path = Path(str(files("hsk_sentences_audio").joinpath("data", "sentences.json")))
        except ModuleNotFoundError:
            raise DataError("testbed: pip install hsk-sentences-audio (data CC-BY-SA-4.0) or pass --parts") from None
    rows = json.loads(Path(path).read_text(encoding="utf-8"))
    out = []
    for row in rows:
        en, zh = (row.get("translation") or {}).get("en", "").strip(), row.get("chinese", "").strip()
        if en and zh and len(en.split()) >= 3:
            out.append(Pair("hsk", row["id"], en, zh))
    return out


def _stable_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def group_near_duplicates(pairs: Iterable[Pair]) -> list[list[Pair]]:
    """Union pairs that share a normalised English or a normalised target side."""
    pairs = list(pairs)
    parent = list(range(len(pairs)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    seen: dict[str, int] = {}
    for i, p in enumerate(pairs):
        for key in ("en:" + normalise(p.text_en), "tgt:" + normalise(p.text_tgt)):
            if key in seen:
                parent[find(i)] = find(seen[key])
            else:
                seen[key] = i
    groups: dict[int, list[Pair]] = {}
    for i, p in enumerate(pairs):
        groups.setdefault(find(i), []).append(p)
    return list(groups.values())


def split_pairs(pairs: Iterable[Pair], sizes: dict[str, int]) -> dict[str, list[Pair]]:
    """Fixed splits: groups ordered by the hash of their smallest signature, test filled first.

    One representative per near-duplicate group (the first in source order), so no split holds
    two near copies either. `sizes`: sentences per split (test, dev, train).
    """
    groups = group_near_duplicates(pairs)
    ranked = sorted(groups, key=lambda g: _stable_hash(min(normalise(p.text_en) for p in g)))
    out: dict[str, list[Pair]] = {name: [] for name in SPLIT_ORDER}
    it = iter(ranked)
    for name in SPLIT_ORDER:
        for group in it:
            out[name].append(group[0])
            if len(out[name]) >= sizes[name]:
                break
    for name in SPLIT_ORDER:
        if len(out[name]) < sizes[name]:
            raise DataError(f"testbed: only {len(out[name])} sentences left for {name} (asked {sizes[name]}); lower the sizes")
    return out


def check_disjoint(splits: dict[str, list[Pair]]) -> None:
    """No normalised English or target text in two splits (the dedup contract, re-checked)."""
    owner: dict[str, str] = {}
    for name, rows in splits.items():
        for p in rows:
            for key in ("en:" + normalise(p.text_en), "tgt:" + normalise(p.text_tgt)):
                if owner.setdefault(key, name) != name:
                    raise DataError(f"testbed: {key!r} is in both {owner[key]} and {name}; the split is not deduplicated")


def all_texts(pairs: Iterable[Pair]) -> list[str]:
    """Both sides of every candidate pair (what the trimmed vocabulary must encode exactly)."""
    return [t for p in pairs for t in (p.text_en, p.text_tgt)]
