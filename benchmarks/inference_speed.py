"""Inference speed before / after, side by side in one run (issue 15): importance search with and
without prefill reuse, the audio tower per clip vs batched, decode steps vs the weight-read bound,
evaluate's segments/s at 32 / 24 / 16 layers, and a torch profiler summary.

The real Qwen2-Audio-7B architecture with random bf16 weights (`qwen2audio_7b.py`), 100 clips of
8 s, exactly 48 new tokens per segment (an end-of-turn id no model emits). Under 8 minutes on one
H200; `--quick` is the same code on a tiny config (8 decoder layers, 8 clips, 2 rounds) on the CPU,
in 1-2 minutes.

    PYTHONPATH=src python benchmarks/inference_speed.py --out /tmp/inference_speed           # one H200
    PYTHONPATH=src python benchmarks/inference_speed.py --quick --out /tmp/inference_speed   # CPU dry run

Importance search: "after" (prefill reuse, the product default) runs the full protocol (8 rounds,
212 candidates + the baseline); "before" (the plain path, `reuse_prefill=False`) runs its first
`--before-rounds` rounds (all with `--before-rounds 8`, ~4 more minutes), every record of which
must equal the "after" run's (scores and hypotheses' sha256); its full time is extrapolated from
its per-evaluation time. On the GPU greedy decoding of random weights is not run-to-run
deterministic (`results/decode_determinism_h200.json`), so the LM head is sharpened x64 for
the comparisons and `equivalence_head_x64` also decodes the plain path twice as the control.
Writes `inference_speed.json`, `profile_search.txt`, `profile_evaluate.txt` and `profile.json`
into `--out`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from importance_speed import NEVER, bandwidth, decode_speed, sync  # noqa: E402
from qwen2audio_7b import build, clips, decoder_bytes  # noqa: E402

from stcompress.config import GenerationConfig  # noqa: E402
from stcompress.data.example import Example  # noqa: E402
from stcompress.importance.evaluator import GenerationEvaluator  # noqa: E402
from stcompress.importance.search import GreedySearch, SearchSettings, candidate_layers  # noqa: E402
from stcompress.model import arch, tower_memo  # noqa: E402
from stcompress.model.layers import decoder_view  # noqa: E402
from stcompress.translate import Translator  # noqa: E402

log = logging.getLogger("inference_speed")


def spaced(total: int, n: int) -> list[int]:
    return sorted({round(i * (total - 1) / (n - 1)) for i in range(n)}) if n > 1 else [0]


def kv_bytes(model, n_layers: int, batch: int, length: int) -> int:
    config = arch.text_config(model)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * n_layers * batch * length * config.num_key_value_heads * head_dim * arch.lm_head(model).weight.element_size()


# -- importance search ------------------------------------------------------------------------

def search(model, processor, examples, rounds, n_new, batch, device, reuse: bool) -> dict:
    tower_memo.MEMO.clear()  # each side encodes its own audio
    translator = Translator(model, processor, generation=GenerationConfig(max_new_tokens=n_new, batch_size=batch), progress=False)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t0 = time.perf_counter()
    evaluator = GenerationEvaluator(translator, examples, ["chrf++"], reuse_prefill=reuse)
    n_layers = arch.num_decoder_layers(model)
    settings = SearchSettings(candidates=candidate_layers(n_layers, None), n_layers=n_layers, metric="chrf++",
                              total_segments=len(examples), rounds=rounds)
    head = arch.lm_head(model).weight
    head.data.mul_(64)  # fewer near-tied argmaxes on random weights (as in reuse_equivalence); timing unchanged
    try:
        with tempfile.TemporaryDirectory() as tmp:
            s = GreedySearch(settings, evaluator, Path(tmp))
            result = s.run()
            records = s.state.all_records()
    finally:
        head.data.div_(64)
    sync(device)
    seconds = time.perf_counter() - t0
    store = evaluator.prefills
    return {
        "reuse_prefill": reuse, "rounds": rounds, "seconds": seconds, "evaluations": len(records),
        "removal_order": result.removal_order,
        "eval_seconds_by_round": {str(r): sum(x.seconds for x in records if x.round == r) for r in range(rounds + 1)},
        "prefill_store": None if store is None else {"hits": store.hits, "misses": store.misses, "refused": store.refused},
        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if device.startswith("cuda") else None,
        "_records": [(r.round, r.layer, r.scores, r.hypotheses_sha256) for r in records],
    }


def reuse_equivalence(model, processor, examples, n_new, layers) -> dict:
    """Candidates decoded with prefill reuse vs the plain path, and the plain path twice (GPU
    run-to-run control: on random weights bf16 kernel noise alone can flip a near-tied argmax,
    `results/decode_determinism_h200.json`), the LM head sharpened x64 to make ties rare."""
    from stcompress.translate import PrefillStore

    translator = Translator(model, processor, generation=GenerationConfig(max_new_tokens=n_new, batch_size=len(examples)),
                            progress=False)
    cache = translator.encode(examples)
    head = arch.lm_head(model).weight
    head.data.mul_(64)
    rows = []
    try:
        store = PrefillStore()
        n = arch.num_decoder_layers(model)
        for layer in layers:
            fast = translator.translate(examples, cache=cache, prefills=store, skip_layer=layer)
            with decoder_view(model, [i for i in range(n) if i != layer]):
                plain = [translator.translate(examples, cache=cache) for _ in range(2)]
            rows.append({"layer": layer,
                         "reuse_vs_plain_identical_segments": sum(a == b for a, b in zip(fast, plain[0])),
                         "plain_vs_plain_identical_segments": sum(a == b for a, b in zip(plain[0], plain[1])),
                         "segments": len(examples)})
    finally:
        head.data.div_(64)
    return {"candidates": rows}


def protocol_bound(model, n_layers, rounds, n_segments, prompt, n_new, bw) -> dict:
    """Bytes every decode step must read (weights + the KV cache so far), over the protocol."""
    n_cand = len(candidate_layers(n_layers, None))
    evals = [(n_layers, 1)] + [(n_layers - r, n_cand - r + 1) for r in range(1, rounds + 1)]
    weights = sum(count * n_new * decoder_bytes(model, layers) for layers, count in evals)
    kv = sum(count * sum(kv_bytes(model, layers, n_segments, prompt + step) for step in range(n_new))
             for layers, count in evals)
    return {"weight_read_seconds": weights / bw, "kv_read_seconds": kv / bw, "decode_bound_seconds": (weights + kv) / bw}


# -- audio tower ------------------------------------------------------------------------------

def tower_flops(model, n_clips: int, frames: int) -> float:
    """Matmul FLOPs of the encoder layers on `frames` mel frames per clip (conv stride 2)."""
    cfg = model.config.audio_config
    t, d, f = frames // 2, cfg.d_model, cfg.encoder_ffn_dim
    per_layer = 2 * t * (4 * d * d + 2 * d * f) + 4 * t * t * d
    return float(n_clips * cfg.encoder_layers * per_layer)


@torch.no_grad()
def tower(model, processor, audios, device, batch: int) -> dict:
    """Per clip (batch 1, the CPU default and the code before) vs batched (`tower_batch`, the CUDA
    default), both through `tower_outputs` with their feature extraction; then the checks: batched
    output in another grouping (bit for bit), against per clip and transformers' full-window encoder."""
    extractor = processor.feature_extractor
    out: dict = {"clips": len(audios), "batch": batch}
    t0 = time.perf_counter()
    feats = extractor(list(audios), sampling_rate=16000, padding="max_length", truncation=True,
                      return_attention_mask=True, return_tensors="pt")
    out["feature_extraction_seconds_all_clips"] = time.perf_counter() - t0
    frames = int(feats["attention_mask"][0].sum())
    flops = tower_flops(model, len(audios), frames)
    out["matmul_tflop"] = flops / 1e12
    results = {}
    for name, n in (("per_clip", 1), ("batched", batch)):
        tower_memo.tower_outputs(model, extractor, audios[:n], remember=False, batch=n)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        results[name] = tower_memo.tower_outputs(model, extractor, audios, remember=False, batch=n)
        sync(device)
        out[f"{name}_seconds"] = time.perf_counter() - t0
        out[f"{name}_tflop_per_s"] = flops / out[f"{name}_seconds"] / 1e12
    out["speedup"] = out["per_clip_seconds"] / out["batched_seconds"]
    regrouped = tower_memo.tower_outputs(model, extractor, audios[::-1][: max(1, len(audios) // 3)], remember=False,
                                         batch=batch)[::-1]
    tail = results["batched"][-len(regrouped):]
    out["batched_same_bits_in_another_grouping"] = all(torch.equal(a, b) for a, b in zip(tail, regrouped))
    out["max_abs_difference_batched_vs_per_clip"] = max(
        float((a.float() - b.float()).abs().max()) for a, b in zip(results["batched"], results["per_clip"]))
    # transformers' own encoder on the full 3000-frame window, 8 clips
    t = arch.audio_tower(model)
    dtype = t.conv1.weight.dtype
    k = min(8, len(audios))
    conv_lengths, out_lengths = t._get_feat_extract_output_lengths(feats["attention_mask"][:k].sum(-1))
    width = t.config.max_source_positions
    pad = torch.arange(width)[None, :] >= conv_lengths[:, None]
    mask = torch.zeros(k, 1, width, width, dtype=dtype).masked_fill_(pad[:, None, None, :], torch.finfo(dtype).min)
    full = t(feats["input_features"][:k].to(device, dtype), attention_mask=mask.to(device)).last_hidden_state.float().cpu()
    diffs = [float((results["batched"][i].float() - full[i, :n]).abs().max()) for i, n in enumerate(out_lengths.tolist())]
    ref = [float((results["per_clip"][i].float() - full[i, :n]).abs().max()) for i, n in enumerate(out_lengths.tolist())]
    out["max_abs_difference_vs_transformers"] = {"batched": max(diffs), "per_clip": max(ref),
                                                 "max_abs_value": float(full.abs().max())}
    return out


# -- evaluate ---------------------------------------------------------------------------------

def evaluate_speed(model, processor, examples, layer_counts, batch, n_new, device, tower_batch: int | None) -> list[dict]:
    """`stcompress evaluate`'s translation (audio not remembered, so the tower runs each call),
    with the tower's clips per call forced to `tower_batch` (None: the default)."""
    rows = []
    total = arch.num_decoder_layers(model)
    previous = os.environ.get(tower_memo.BATCH_ENV)
    if tower_batch is not None:
        os.environ[tower_memo.BATCH_ENV] = str(tower_batch)
    try:
        for n in layer_counts:
            keep = spaced(total, n)
            translator = Translator(model, processor, generation=GenerationConfig(max_new_tokens=n_new, batch_size=batch),
                                    progress=False, remember_audio=False)
            times = []
            with decoder_view(model, keep):
                for _ in range(2):
                    sync(device)
                    t0 = time.perf_counter()
                    hyps = translator.translate(examples)
                    sync(device)
                    times.append(time.perf_counter() - t0)
            rows.append({"decoder_layers": len(keep), "batch": batch, "tower_batch": tower_memo.tower_batch(model),
                         "first_call_seconds": times[0], "seconds": times[1],
                         "segments_per_s": len(examples) / times[1], "tokens": sum(h.n_tokens for h in hyps)})
    finally:
        if previous is None:
            os.environ.pop(tower_memo.BATCH_ENV, None)
        else:
            os.environ[tower_memo.BATCH_ENV] = previous
    base = rows[0]["segments_per_s"]
    for r in rows:
        r["speedup_vs_first"] = r["segments_per_s"] / base
    return rows


# -- profiler ---------------------------------------------------------------------------------

def profiled(fn, device: str, path: Path, rows: int = 30) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        fn()
        sync(device)
    key = "self_device_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    averages = prof.key_averages()
    path.write_text(averages.table(sort_by=key, row_limit=rows) + "\n")
    top = sorted(averages, key=lambda e: getattr(e, key), reverse=True)[:rows]
    return [{"name": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3,
             "self_device_ms": getattr(e, "self_device_time_total", 0) / 1e3} for e in top]


def graph_checks(model, processor, examples, n_new, device, repeat=3) -> dict | None:
    """One StaticGreedy construction + CUDA-graph capture (paid once per evaluated variant): the
    first in the process for this shape (with the warm-up step) and later ones (without); then the
    graph against eager steps on 8 segments, the LM head sharpened x64 (random weights give near-flat
    logits, where bf16 rounding alone flips the argmax): a wrong graph diverges at step 1 in every row."""
    from stcompress.model import static_decode

    cuda = device.startswith("cuda")  # on the CPU there is no graph: the code path runs, eager both times

    translator = Translator(model, processor, generation=GenerationConfig(max_new_tokens=n_new, batch_size=len(examples)),
                            progress=False)
    cache = translator.encode(examples)
    decoder, head = arch.text_model(model), arch.lm_head(model)

    def prefill(subset):
        embeds, mask = translator.build_inputs(subset, cache)
        positions = arch.mask_positions(mask)
        out = decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True)
        return out, mask, positions

    result: dict = {}
    with torch.no_grad():
        out, mask, positions = prefill(examples)
        static_decode._WARMED.clear()
        times = []
        for _ in range(repeat):
            sync(device)
            t0 = time.perf_counter()
            runner = static_decode.StaticGreedy(model, out.past_key_values, mask, positions, n_new, {NEVER}, 151643)
            if cuda:
                with torch.cuda.device(mask.device):
                    runner._capture()
            sync(device)
            times.append(1e3 * (time.perf_counter() - t0))
            del runner
        result["capture_ms_first_with_warmup"] = times[0]
        result["capture_ms_later"] = min(times[1:])
        del out
        head.weight.data.mul_(64)
        try:
            out, mask, positions = prefill(examples[:8])
            first = head(out.last_hidden_state[:, -1]).argmax(-1)
            # graph (its shape's first capture: warm-up), graph again (no warm-up), eager
            runs = [static_decode.StaticGreedy(model, out.past_key_values, mask, positions, n_new, {NEVER}, 151643,
                                               cuda_graph=graph).run(first) for graph in (True, True, False)]
        finally:
            head.weight.data.div_(64)

    def divergence(a, b):
        same = a == b
        return [int((~row).nonzero()[0, 0]) if not bool(row.all()) else -1 for row in same]

    result["graph_without_warmup_vs_eager_identical"] = bool(torch.equal(runs[1], runs[2]))
    result["first_divergence_graph_without_warmup_vs_eager"] = divergence(runs[1], runs[2])
    result["first_divergence_graph_vs_graph"] = divergence(runs[0], runs[1])
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="directory for the JSON and the profiler summaries")
    p.add_argument("--quick", action="store_true", help="tiny config on the CPU (seconds): the same code path")
    p.add_argument("--before-rounds", type=int, default=None, help="rounds of the plain search (default 2; quick: all)")
    p.add_argument("--device", default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    quick = args.quick
    device = args.device or ("cpu" if quick else "cuda")
    segments, seconds, n_new, rounds = (8, 2.0, 6, 2) if quick else (100, 8.0, 48, 8)
    before_rounds = args.before_rounds if args.before_rounds is not None else (rounds if quick else 2)
    if quick:
        torch.set_num_threads(1)
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    model, processor, build_seconds = build("tiny" if quick else "7b", device, dtype)
    model.generation_config.eos_token_id = [NEVER]
    if quick:  # 8 decoder layers: 6 candidates, 11 evaluations in 2 rounds
        from stcompress.model.layers import remove_decoder_layers

        remove_decoder_layers(model, range(8, arch.num_decoder_layers(model)))
    examples = [Example(id=f"seg{i:03d}", audio=a, target_lang="de", references=("Das ist ein Beispielsatz.",))
                for i, a in enumerate(clips(segments, seconds))]
    n_layers = arch.num_decoder_layers(model)
    record: dict = {
        "command": " ".join(sys.argv), "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "torch": torch.__version__, "transformers": __import__("transformers").__version__, "quick": quick,
        "parameters": sum(x.numel() for x in model.parameters()), "build_seconds": build_seconds,
        "segments": segments, "clip_seconds": seconds, "new_tokens": n_new,
    }
    bw = bandwidth(device)
    record["measured_bandwidth_bytes_per_s"] = bw

    def save() -> None:
        tmp = args.out / ".inference_speed.json.tmp"
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        tmp.replace(args.out / "inference_speed.json")

    # 1. importance search, before (plain) and after (prefill reuse)
    before = search(model, processor, examples, before_rounds, n_new, segments, device, reuse=False)
    log.info("search before (%d rounds): %.1f s", before_rounds, before["seconds"])
    after = search(model, processor, examples, rounds, n_new, segments, device, reuse=True)
    log.info("search after (%d rounds): %.1f s", rounds, after["seconds"])
    b_records, a_records = before.pop("_records"), after.pop("_records")
    n_cand = len(candidate_layers(n_layers, None))
    full_evals = 1 + sum(n_cand - r for r in range(rounds))
    per_eval = before["seconds"] / before["evaluations"]
    record["importance"] = {
        "protocol_evaluations": full_evals, "before": before, "after": after,
        "before_extrapolated_seconds": before["seconds"] if before_rounds == rounds else per_eval * full_evals,
        "same_records_in_common_rounds": a_records[: len(b_records)] == b_records,
        "same_removal_order_prefix": after["removal_order"][:before_rounds] == before["removal_order"],
    }
    imp = record["importance"]
    imp["speedup"] = imp["before_extrapolated_seconds"] / after["seconds"]
    imp["equivalence_head_x64"] = reuse_equivalence(model, processor, examples, n_new, [1, n_layers // 2, n_layers - 2])
    prompt = len(Translator(model, processor).prompt.input_ids("de", 0)) + int(seconds * 25)
    if bw:
        imp["bound"] = protocol_bound(model, n_layers, rounds, segments, prompt, n_new, bw)
    save()

    # 2. audio tower
    audios = [ex.audio for ex in examples]
    record["tower"] = tower(model, processor, audios, device, batch=tower_memo.tower_batch(model) if not quick else 4)
    log.info("tower: %s", {k: v for k, v in record["tower"].items()})
    save()

    # 3. decode steps vs the weight-read bound
    record["decode_steps"] = decode_speed(model, processor, examples, [n_layers], [1, min(32, segments)], n_new, device, bw)
    save()

    # 4. evaluate segments/s
    counts = [n_layers, n_layers * 3 // 4, n_layers // 2]
    batch32 = min(32, segments)
    record["evaluate"] = {
        "after": evaluate_speed(model, processor, examples, counts, batch32, n_new, device, 4 if quick else None),
        "before_tower_per_clip": evaluate_speed(model, processor, examples, counts, batch32, n_new, device, 1),
    }
    save()

    # 5. profiles: one candidate of round 1 with prefill reuse, one evaluate call at full depth
    try:
        profiles(model, processor, examples, segments, n_new, n_layers, device, args.out)
    except Exception as exc:  # noqa: BLE001
        record["profile_error"] = f"{type(exc).__name__}: {exc}"
    try:  # the last part: a failure here must not lose the rest
        record["graph"] = graph_checks(model, processor, examples, n_new, device)
    except Exception as exc:  # noqa: BLE001
        record["graph"] = {"error": f"{type(exc).__name__}: {exc}"}
    record["wall_seconds"] = time.perf_counter() - start
    save()
    print(json.dumps({k: v for k, v in record.items() if k not in ("decode_steps",)}, indent=1))


def profiles(model, processor, examples, segments, n_new, n_layers, device, out: Path) -> None:
    gen = GenerationConfig(max_new_tokens=n_new, batch_size=segments)
    translator = Translator(model, processor, generation=gen, progress=False)
    evaluator = GenerationEvaluator(translator, examples, ["chrf++"])
    evaluator.evaluate([], segments)  # fills the round's prefill
    layer = n_layers // 2
    summary = {"search_candidate": profiled(lambda: evaluator.evaluate([layer], segments), device, out / "profile_search.txt")}
    del evaluator
    ev = Translator(model, processor, generation=GenerationConfig(max_new_tokens=n_new, batch_size=min(32, segments)),
                    progress=False, remember_audio=False)
    summary["evaluate_32"] = profiled(lambda: ev.translate(examples), device, out / "profile_evaluate.txt")
    (out / "profile.json").write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
