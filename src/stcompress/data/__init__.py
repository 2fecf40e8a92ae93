"""Data layer: examples from the built-in demo, local manifests or HF datasets; audio at 16 kHz."""

from stcompress.data.audio import SAMPLE_RATE, decode_audio_bytes, load_audio, to_mono_16k
from stcompress.data.example import Example, LoadResult, Skipped
from stcompress.data.sources import builtin_manifest_path, examples_from_hf, load_examples, load_hf_dataset
from stcompress.data.splits import paper_split, select_subset

__all__ = [
    "SAMPLE_RATE",
    "Example",
    "LoadResult",
    "Skipped",
    "builtin_manifest_path",
    "decode_audio_bytes",
    "examples_from_hf",
    "load_audio",
    "load_examples",
    "load_hf_dataset",
    "paper_split",
    "select_subset",
    "to_mono_16k",
]
