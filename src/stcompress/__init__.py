"""stcompress: make audio-language models cheap enough to deploy for speech translation."""

__version__ = "0.1.0"
