"""The sanity bar of issue 10: the testbed's language model translating *text*, few-shot.

The speech teacher can hardly beat the same LM reading the English transcript, so its text-only
few-shot quality on the test sentences bounds what the speech pipeline should expect. The LM is
the base model's own (Gemma 3 270M, trimmed vocabulary, untouched by any training), prompted with
K fixed training pairs as plain lines ("English: ...\nGerman: ...") and decoded greedily until a
newline; scores are sacrebleu's, as in `stcompress evaluate`.

    PYTHONPATH=src python benchmarks/testbed/text_bar.py --model runs/testbed/base \
        --data runs/testbed-data/de --shots 5 --out benchmarks/testbed/results/text-bar-de.json

The cascade bar: `--split dev --sources DIR/hypotheses.jsonl` reads the English side from a
transcription's outputs instead (an `stcompress evaluate` of the ASR model, e.g. the recipe's
`asr-dev`), so the LM translates what the model heard: what a cascade of the two would score.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

LANGS = {"de": "German", "zh": "Chinese"}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def prompts(train: list[dict], test: list[dict], lang: str, shots: int) -> list[str]:
    seen, examples = set(), []
    for row in train:  # the first `shots` distinct training sentences (fixed; never test or dev)
        if row["sentence"] not in seen and len(row["text_en"].split()) <= 14:
            seen.add(row["sentence"])
            examples.append(f"English: {row['text_en']}\n{LANGS[lang]}: {row[f'text_{lang}']}\n\n")
        if len(examples) == shots:
            break
    head = "".join(examples)
    return [f"{head}English: {row['text_en']}\n{LANGS[lang]}:" for row in test]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True, help="a build-data language folder")
    ap.add_argument("--shots", type=int, default=5)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--split", choices=("test", "dev"), default="test", help="the sentences translated")
    ap.add_argument("--sources", type=Path, default=None,
                    help="hypotheses.jsonl of a transcription (id -> hypothesis): the English side it heard")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

    from stcompress.metrics.text import corpus_score

    lang = "zh" if (args.data / "test.jsonl").read_text(encoding="utf-8").count('"text_zh"') else "de"
    train, test = read_jsonl(args.data / "train.jsonl"), read_jsonl(args.data / f"{args.split}.jsonl")
    test = list({r["sentence"]: r for r in test}.values())[: args.limit]
    if args.sources is not None:  # the cascade: the English side as a transcription heard it
        heard = {r["id"]: r["hypothesis"] for r in read_jsonl(args.sources)}
        missing = [r["id"] for r in test if r["id"] not in heard]
        if missing:
            raise SystemExit(f"error: {args.sources} has no hypothesis for {len(missing)} of the {args.split} clips "
                             f"(first: {missing[0]}); give the transcription of this data's {args.split} split")
        test = [{**r, "text_en": heard[r["id"]]} for r in test]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = AutoProcessor.from_pretrained(str(args.model)).tokenizer
    model = Qwen2AudioForConditionalGeneration.from_pretrained(str(args.model), dtype=torch.float32).to(device).eval()
    newline = tok.convert_tokens_to_ids("\n") if "\n" in tok.get_vocab() else None
    stops = [i for i in {tok.eos_token_id, newline, *tok.encode("\n\n", add_special_tokens=False)} if i is not None]
    texts = prompts(train, test, lang, args.shots)
    tok.padding_side = "left"
    hyps, start = [], time.perf_counter()
    for i in range(0, len(texts), args.batch_size):
        batch = tok(texts[i:i + args.batch_size], return_tensors="pt", padding=True).to(device)
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=96, do_sample=False, eos_token_id=stops,
                                 pad_token_id=tok.pad_token_id)
        for row in out[:, batch["input_ids"].shape[1]:]:
            hyps.append(tok.decode(row, skip_special_tokens=True).split("\n")[0].strip())
    refs = [r[f"text_{lang}"] for r in test]
    scores = {m: corpus_score(m, hyps, refs, lang).to_dict() for m in ("bleu", "chrf", "chrf++")}
    record = {"model": str(args.model), "lang": lang, "shots": args.shots, "split": args.split,
              "sources": str(args.sources) if args.sources else "reference transcripts", "segments": len(test),
              "seconds": round(time.perf_counter() - start, 1), "device": device,
              "scores": {k: round(v["score"], 2) for k, v in scores.items()},
              "signatures": {k: v["signature"] for k, v in scores.items()},
              "prompt_example": texts[0], "hypotheses": hyps, "references": refs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, ensure_ascii=False, indent=1), encoding="utf-8")
    tmp.replace(args.out)
    print(json.dumps({k: record[k] for k in ("lang", "shots", "segments", "seconds", "scores")}))


if __name__ == "__main__":
    main()
