"""Can a small Qwen2-Audio with a real Whisper encoder learn the demo task in CPU minutes?

`stcompress demo` must train a teacher in a few minutes on 2 CPU cores and then report real
numbers. This trains the projector + LM decoder of `whisper_init.build_demo_model` (Whisper tiny.en
audio tower, frozen) on the demo corpus (`scripts/make_demo_corpus.py`) with a plain PyTorch loop,
then translates with the project's engine (`Translator`) and scores chrF at several training-step
checkpoints (wall and CPU seconds are recorded; `--by seconds` only on a quiet machine). Held-out
sets: other sentences (same voice), the training sentences spoken by an unseen voice, and both.
Each score comes with its chance level: the same hypotheses scored against shuffled references
(what vocabulary overlap alone earns). `--random-tower` is the ablation without Whisper weights.

    python scripts/make_demo_corpus.py --full joe,awb,slt --out /tmp/demo-corpus
    python benchmarks/demo_feasibility.py --corpus /tmp/demo-corpus --train-voices joe,awb \
        --test-voices slt --checkpoints 300,600 --out /tmp/feasibility.json

Measured (2 cores, 4 layers x 256, batch 8, active head): ~5.5 steps/s; 300 steps (55 s) give
chrF 93 train / 85 unseen voice / 33 unseen sentences (chance 13-22).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from stcompress.config import GenerationConfig
from stcompress.data.audio import load_audio
from stcompress.data.example import Example
from stcompress.metrics.text import corpus_score
from stcompress.model import arch
from stcompress.model.whisper_init import build_demo_model
from stcompress.prompt import IGNORE_INDEX, PromptBuilder
from stcompress.translate import AudioCache, Translator

log = logging.getLogger("demo_feasibility")


@dataclass(frozen=True)
class Clip:
    id: str
    sentence: str
    voice: str
    split: str
    audio_path: Path
    texts: dict[str, str]


def load_corpus(dirs: list[Path]) -> list[Clip]:
    clips = []
    for d in dirs:
        for line in (d / "manifest.jsonl").read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            texts = {k[5:]: v for k, v in r.items() if k.startswith("text_")}
            clips.append(Clip(r["id"], r["sentence"], r["voice"], r["split"], d / r["audio"], texts))
    return clips


@torch.no_grad()
def tower_features(model, processor, clips: list[Clip], batch: int = 16) -> tuple[dict[str, torch.Tensor], float]:
    """Frozen audio-tower output per clip (trimmed path), and the seconds it took."""
    start, out = time.perf_counter(), {}
    for i in range(0, len(clips), batch):
        chunk = clips[i : i + batch]
        feats = processor.feature_extractor(
            [load_audio(c.audio_path) for c in chunk], sampling_rate=16000, padding="max_length",
            return_attention_mask=True, return_tensors="pt",
        )
        states, lengths = arch.tower_states(model, feats["input_features"], feats["attention_mask"])
        for c, h, n in zip(chunk, states, lengths.tolist()):
            out[c.id] = h[:n]
    return out, time.perf_counter() - start


def voice_retrieval(features: dict[str, torch.Tensor], clips: list[Clip], a: str, b: str) -> float:
    """Share of voice-`a` clips whose nearest voice-`b` clip (cosine of mean features) is the same sentence."""
    def table(voice):
        rows = sorted((c.sentence, features[c.id].mean(0)) for c in clips if c.voice == voice)
        return [s for s, _ in rows], F.normalize(torch.stack([v for _, v in rows]), dim=-1)

    sa, va = table(a)
    sb, vb = table(b)
    best = (va @ vb.T).argmax(-1)
    return sum(sa[i] == sb[j] for i, j in enumerate(best.tolist())) / len(sa)


def make_pairs(clips, langs, prompt: PromptBuilder, features) -> list[tuple[str, list[int], list[int]]]:
    pairs = []
    for c in clips:
        for lang in langs:
            ids, labels = prompt.training_ids(lang, features[c.id].shape[0], c.texts[lang])
            pairs.append((c.id, ids, labels))
    return pairs


class ActiveHead(torch.nn.Module):
    """LM head restricted to the corpus' token ids, with every other row frozen at zero.

    Frozen zero rows give logit 0, so the full-vocabulary softmax is exactly
    logsumexp(active logits, log(n_other)): the same loss as the full head for that
    parametrisation, at the cost of a few thousand rows instead of 151k.
    """

    def __init__(self, weight: torch.Tensor, active: torch.Tensor):
        super().__init__()
        self.active = active
        self.weight = torch.nn.Parameter(weight[active].clone())
        self.log_rest = math.log(weight.shape[0] - len(active))
        self.index = torch.full((weight.shape[0],), -1, dtype=torch.long)
        self.index[active] = torch.arange(len(active))

    def loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = hidden @ self.weight.T
        rest = logits.new_full((logits.shape[0], 1), self.log_rest)
        lse = torch.logsumexp(torch.cat([logits, rest], dim=-1), dim=-1)
        return (lse - logits.gather(1, self.index[targets][:, None])[:, 0]).mean()

    @torch.no_grad()
    def write_into(self, lm_head: torch.nn.Linear) -> None:
        lm_head.weight.zero_()
        lm_head.weight[self.active] = self.weight


def batch_loss(model, pairs, features, head_mode: str, active: ActiveHead | None) -> torch.Tensor:
    """Teacher-forced CE on target tokens only; the LM head runs on those positions alone."""
    width = max(len(ids) for _, ids, _ in pairs)
    ids = torch.full((len(pairs), width), 151643, dtype=torch.long)
    labels = torch.full((len(pairs), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for i, (_, row, lab) in enumerate(pairs):  # right padding: positions need no shifting
        ids[i, : len(row)], labels[i, : len(lab)], mask[i, : len(row)] = torch.tensor(row), torch.tensor(lab), 1
    embeds = arch.embed_tokens(model)(ids)
    audio = arch.projector(model)(torch.cat([features[cid] for cid, _, _ in pairs]))
    embeds = embeds.masked_scatter((ids == arch.audio_token_id(model))[..., None], audio.to(embeds.dtype))
    hidden = arch.text_model(model)(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    h = hidden[:, :-1][keep]
    if head_mode == "active":
        return active.loss(h, targets[keep])
    return F.cross_entropy(arch.lm_head(model)(h), targets[keep])


def evaluate(model, processor, sets: dict[str, list[Clip]], langs, features, max_new: int) -> dict:
    """Translate each eval set with the project's engine (cache prefilled from the frozen tower)."""
    gen = GenerationConfig(max_new_tokens=max_new, batch_size=16)
    translator = Translator(model, processor, generation=gen, progress=False)
    cache = AudioCache()
    with torch.no_grad():
        for clips in sets.values():
            for c in clips:
                cache.embeds[c.id] = arch.projector(model)(features[c.id])
    out, rng = {}, random.Random(0)
    for name, clips in sets.items():
        for lang in langs:
            examples = [Example(id=c.id, audio=None, target_lang=lang, references=(c.texts[lang],)) for c in clips]
            start = time.perf_counter()
            hyps = [h.text for h in translator.translate(examples, cache)]
            refs = [c.texts[lang] for c in clips]
            shuffled = refs[1:] + refs[:1]
            rng.shuffle(shuffled)
            out[f"{name}/{lang}"] = {
                "chrf": round(corpus_score("chrf", hyps, refs, lang).score, 2),
                "chrf_chance": round(corpus_score("chrf", hyps, shuffled, lang).score, 2),
                "n": len(clips), "decode_s": round(time.perf_counter() - start, 2),
                "samples": [[r, h] for r, h in zip(refs[:3], hyps[:3])],
            }
    return out


def trainable_parameters(model, args) -> list[torch.nn.Parameter]:
    model.requires_grad_(False)
    for module in (arch.projector(model), arch.decoder_layers(model), arch.text_model(model).norm):
        module.requires_grad_(True)
    if args.train_embeddings:
        arch.embed_tokens(model).requires_grad_(True)
    if args.head == "full":
        arch.lm_head(model).requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def lr_at(args, elapsed: float, step: int) -> float:
    warm = min(1.0, (step + 1) / args.warmup_steps)
    if args.schedule == "cosine":
        return args.lr * warm * 0.5 * (1 + math.cos(math.pi * min(1.0, elapsed / args.checkpoints[-1])))
    return args.lr * warm


@torch.no_grad()
def randomize(tower: torch.nn.Module, seed: int) -> None:
    """The ablation: the same tower with fan-in scaled random weights instead of Whisper's."""
    gen = torch.Generator().manual_seed(seed)
    for module in tower.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv1d)):
            module.weight.copy_(torch.randn(module.weight.shape, generator=gen) / math.sqrt(module.weight[0].numel()))
            if module.bias is not None:
                module.bias.zero_()


def run(args) -> dict:
    # Once the loss is small, Adam states and gradients go subnormal and every CPU step slows
    # ~10x (measured: 0.3 s -> 5 s a step); flushing them to zero removes that.
    torch.set_flush_denormal(True)
    torch.manual_seed(args.seed)
    t_build = time.perf_counter()
    model, processor = build_demo_model(
        text_layers=args.layers, hidden_size=args.hidden, intermediate_size=args.ffn,
        num_heads=args.heads, num_kv_heads=max(1, args.heads // 2), seed=args.seed,
    )
    build_s = time.perf_counter() - t_build
    if args.random_tower:
        randomize(arch.audio_tower(model), args.seed)
    clips = [c for c in load_corpus(args.corpus) if c.voice in args.train_voices + args.test_voices]
    features, encode_s = tower_features(model, processor, clips)
    prompt = PromptBuilder(processor)
    train = [c for c in clips if c.split == "train" and c.voice in args.train_voices]
    pairs = make_pairs(train, args.langs, prompt, features)
    main_voice, other = args.train_voices[0], args.test_voices[0]
    pick = lambda split, voice, n: [c for c in clips if c.split == split and c.voice == voice][:n]  # noqa: E731
    sets = {
        "train": pick("train", main_voice, args.eval_train), "heldout_sent": pick("test", main_voice, 99),
        "heldout_voice": pick("train", other, args.eval_train), "heldout_both": pick("test", other, 99),
    }
    active = None
    if args.head == "active":
        used = sorted({t for _, ids, lab in pairs for t in lab if t != IGNORE_INDEX})
        active = ActiveHead(arch.lm_head(model).weight.detach(), torch.tensor(used))
    params = trainable_parameters(model, args) + ([active.weight] if active else [])
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    result = {
        "config": json.loads(json.dumps(vars(args), default=str)),
        "params": {c: sum(p.numel() for n, p in model.named_parameters() if arch.component_of(n) == c) for c in arch.COMPONENTS},
        "trainable_params": sum(p.numel() for p in params),
        "build_s": round(build_s, 1), "encode_s": round(encode_s, 1), "n_clips_encoded": len(clips),
        "n_train_pairs": len(pairs), "voice_retrieval": None, "loss": [], "checkpoints": [],
    }
    if len(args.train_voices + args.test_voices) > 1:
        result["voice_retrieval"] = round(voice_retrieval(features, clips, main_voice, other), 3)
    log.info("params %s, trainable %d, encode %.1fs for %d clips", result["params"], result["trainable_params"], encode_s, len(clips))
    rng, step, elapsed, todo = random.Random(args.seed), 0, 0.0, list(args.checkpoints)
    cpu, result["loadavg_start"] = 0.0, os.getloadavg()[0]
    order: list = []
    while todo:
        if not order:
            order = pairs[:]
            rng.shuffle(order)
        batch, order = order[: args.batch_size], order[args.batch_size :]
        t0, c0 = time.perf_counter(), time.process_time()
        model.train()
        for g in opt.param_groups:
            g["lr"] = lr_at(args, elapsed, step)
        loss = batch_loss(model, batch, features, args.head, active)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        elapsed += time.perf_counter() - t0
        cpu += time.process_time() - c0
        step += 1
        if step % 10 == 0:
            result["loss"].append([step, round(elapsed, 1), round(loss.item(), 3)])
            log.info("step %d  %.0fs  loss %.3f", step, elapsed, loss.item())
        if (step if args.by == "steps" else elapsed) >= todo[0]:
            model.eval()
            if active is not None:
                active.write_into(arch.lm_head(model))
            t_eval = time.perf_counter()
            scores = evaluate(model, processor, sets, args.langs, features, args.max_new_tokens)
            result["checkpoints"].append({
                "budget": todo.pop(0), "train_s": round(elapsed, 1), "steps": step,
                "steps_per_s": round(step / elapsed, 2), "loss": round(loss.item(), 3),
                "train_cpu_s": round(cpu, 1), "loadavg": os.getloadavg()[0],
                "eval_s": round(time.perf_counter() - t_eval, 1), "scores": scores,
            })
            log.info("checkpoint %s", json.dumps({k: v["chrf"] for k, v in scores.items()}))
    return result


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", type=Path, nargs="+", required=True, help="dirs with manifest.jsonl (make_demo_corpus.py)")
    p.add_argument("--train-voices", default="joe")
    p.add_argument("--test-voices", default="slt")
    p.add_argument("--langs", default="de")
    p.add_argument("--checkpoints", default="300,600,900", help="training steps (or seconds) at which to evaluate")
    p.add_argument("--by", choices=["steps", "seconds"], default="steps",
                   help="seconds only on a quiet machine: a shared one makes wall time meaningless")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=768)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head", choices=["full", "frozen", "active"], default="active", help="LM head: trained, frozen, or corpus rows only")
    p.add_argument("--train-embeddings", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--schedule", choices=["constant", "cosine"], default="constant")
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-train", type=int, default=40, help="training sentences scored (per voice)")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--random-tower", action="store_true", help="ablation: random audio tower instead of Whisper")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    args.train_voices = args.train_voices.split(",")
    args.test_voices = args.test_voices.split(",")
    args.langs = args.langs.split(",")
    args.checkpoints = [float(x) for x in args.checkpoints.split(",")]
    return args


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args()
    result = run(args)
    text = json.dumps(result, indent=1, ensure_ascii=False)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
    print(json.dumps([{k: c[k] for k in ("budget", "train_s", "steps", "steps_per_s", "loss")} | {n: s["chrf"] for n, s in c["scores"].items()} for c in result["checkpoints"]], indent=1))


if __name__ == "__main__":
    main()
