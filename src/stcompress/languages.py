"""Language codes we know: their English names (for the prompt) and their sacrebleu tokenizer."""

from __future__ import annotations

from stcompress.errors import StcompressError

# code -> (English name used in the prompt, sacrebleu BLEU tokenizer)
_LANGUAGES: dict[str, tuple[str, str]] = {
    "en": ("English", "13a"),
    "de": ("German", "13a"),
    "zh": ("Chinese", "zh"),
    "ja": ("Japanese", "ja-mecab"),
    "ko": ("Korean", "ko-mecab"),
    "fr": ("French", "13a"),
    "es": ("Spanish", "13a"),
    "it": ("Italian", "13a"),
    "pt": ("Portuguese", "13a"),
    "nl": ("Dutch", "13a"),
    "ru": ("Russian", "13a"),
    "ar": ("Arabic", "13a"),
    "fa": ("Persian", "13a"),
    "tr": ("Turkish", "13a"),
    "cs": ("Czech", "13a"),
    "pl": ("Polish", "13a"),
}

# Languages written without spaces between words: chrF (not chrF++) is the paper's choice there.
_NO_SPACES = {"zh", "ja", "ko"}


def check_language(code: str, *, item: str = "target_lang") -> str:
    if code not in _LANGUAGES:
        known = ", ".join(sorted(_LANGUAGES))
        raise StcompressError(f"{item}: unknown language code {code!r}; use one of {known}")
    return code


def language_name(code: str) -> str:
    return _LANGUAGES[check_language(code)][0]


def bleu_tokenizer(code: str) -> str:
    return _LANGUAGES[check_language(code)][1]


def default_selection_metric(code: str) -> str:
    """The paper's layer-selection metric: chrF++ for German (spaced scripts), chrF for Chinese."""
    return "chrf" if check_language(code) in _NO_SPACES else "chrf++"


def known_languages() -> list[str]:
    return sorted(_LANGUAGES)
