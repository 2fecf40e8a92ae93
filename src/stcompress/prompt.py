"""The one prompt builder: the paper's translation prompt, rendered by the processor's chat template.

Training and inference use the same rendering (the paper: training prompt = inference prompt).
The rendered text holds one <|AUDIO|> placeholder; the token ids around it are computed once per
language, and each clip's ids are prefix + [audio token] * n + suffix, exactly what the processor
produces when it expands the placeholder for an n-token clip.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stcompress.config import PromptConfig
from stcompress.errors import ModelError
from stcompress.languages import language_name

AUDIO_PLACEHOLDER = "<|AUDIO|>"
IGNORE_INDEX = -100  # label of positions the loss skips (torch's cross_entropy default)


def num_audio_tokens(n_mel_frames: int) -> int:
    """Audio tokens for a clip of n mel frames (conv stride 2, then avg-pool 2): 8 s -> 200."""
    return ((n_mel_frames - 1) // 2 + 1 - 2) // 2 + 1


def messages(cfg: PromptConfig, target_lang: str, audio_ref: str = "audio.wav") -> list[dict[str, Any]]:
    instruction = cfg.instruction.format(language=language_name(target_lang))
    return [
        {"role": "system", "content": cfg.system},
        {
            "role": "user",
            "content": [{"type": "audio", "audio_url": audio_ref}, {"type": "text", "text": instruction}],
        },
    ]


@dataclass(frozen=True)
class RenderedPrompt:
    text: str  # the full chat-template rendering, with one <|AUDIO|>
    prefix_ids: tuple[int, ...]
    suffix_ids: tuple[int, ...]
    audio_token_id: int

    def input_ids(self, n_audio_tokens: int) -> list[int]:
        return [*self.prefix_ids, *([self.audio_token_id] * n_audio_tokens), *self.suffix_ids]


class PromptBuilder:
    """Renders and tokenizes the prompt for each target language (cached)."""

    def __init__(self, processor: Any, cfg: PromptConfig | None = None):
        self.processor = processor
        self.cfg = cfg or PromptConfig()
        self._cache: dict[str, RenderedPrompt] = {}

    def render(self, target_lang: str, *, add_generation_prompt: bool = True) -> str:
        if getattr(self.processor, "chat_template", None) is None:
            raise ModelError("model.path: the processor has no chat template; save the base model's processor with the model")
        return self.processor.apply_chat_template(
            messages(self.cfg, target_lang), add_generation_prompt=add_generation_prompt, tokenize=False
        )

    def rendered(self, target_lang: str) -> RenderedPrompt:
        if target_lang not in self._cache:
            text = self.render(target_lang)
            if text.count(AUDIO_PLACEHOLDER) != 1:
                raise ModelError(
                    f"model.path: the chat template rendered {text.count(AUDIO_PLACEHOLDER)} {AUDIO_PLACEHOLDER} "
                    "placeholders (expected 1); use the Qwen2-Audio chat template"
                )
            before, after = text.split(AUDIO_PLACEHOLDER)
            tok = self.processor.tokenizer
            self._cache[target_lang] = RenderedPrompt(
                text=text,
                prefix_ids=tuple(tok(before, add_special_tokens=False)["input_ids"]),
                suffix_ids=tuple(tok(after, add_special_tokens=False)["input_ids"]),
                audio_token_id=tok.convert_tokens_to_ids(AUDIO_PLACEHOLDER),
            )
        return self._cache[target_lang]

    def input_ids(self, target_lang: str, n_audio_tokens: int) -> list[int]:
        return self.rendered(target_lang).input_ids(n_audio_tokens)

    def target_ids(self, text: str) -> list[int]:
        """Token ids of an assistant answer as the chat template closes it: text + <|im_end|>."""
        tok = self.processor.tokenizer
        return [*tok(text, add_special_tokens=False)["input_ids"], tok.convert_tokens_to_ids("<|im_end|>")]

    def training_ids(self, target_lang: str, n_audio_tokens: int, target: str) -> tuple[list[int], list[int]]:
        """(input_ids, labels) of one training pair: the inference prompt, then target + <|im_end|>.

        The chat template closes an assistant turn with "<|im_end|>\n"; the ids stop at <|im_end|>
        because generation stops there and never produces the newline. Labels are IGNORE_INDEX on
        the whole prompt (audio tokens included), so the loss covers exactly what inference
        generates: the target text (stripped) and the end-of-turn token.
        """
        prompt = self.input_ids(target_lang, n_audio_tokens)
        answer = self.target_ids(target.strip())
        return [*prompt, *answer], [IGNORE_INDEX] * len(prompt) + answer
