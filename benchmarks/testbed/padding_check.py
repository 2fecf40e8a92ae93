"""Left-padded batched prefill vs each row alone, on the testbed's decoder (Gemma 3 270M shape).

zh-run1 (benchmarks/testbed/results/README.md) decoded whole batches to garbage on the GPU (every row
but the unpadded one starting with the same wrong token) while the same model and clips decode
correctly on a CPU. The broken batches had prompt widths 65, 97 and 129 (1 more than a multiple of
32); the sound ones 84, 95, 98, 101, 104, 111, 124, 147. This checks the suspects with random
weights (nothing to download or carry):

  sdpa   torch's scaled_dot_product_attention on the decoder's shapes (4 query heads, 1 KV head,
         head_dim 256, fp32) with a left-padded causal boolean mask, against a float64 reference
         on the rows' real positions;
  model  Gemma3TextModel (the testbed config, random weights, fp32) called as the translation
         engine calls it (inputs_embeds, 2-D mask, positions from the mask): each row's last hidden
         state in the padded batch against the row alone, for sdpa and eager attention.

    PYTHONPATH=src python benchmarks/testbed/padding_check.py --out $OUT/padding_check.json      # GPU, ~3 min
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from stcompress.model import attention

GEMMA_270M = dict(
    hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1,
    head_dim=256, query_pre_attn_scalar=256, sliding_window=512, max_position_embeddings=32768,
    rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh", vocab_size=1024, pad_token_id=0,
    layer_types=[("full_attention" if (i + 1) % 6 == 0 else "sliding_attention") for i in range(18)],
    rope_parameters={"full_attention": {"rope_theta": 1e6, "rope_type": "default"},
                     "sliding_attention": {"rope_theta": 1e4, "rope_type": "default"}},
)


def pads_for(batch: int, width: int, gen: torch.Generator) -> list[int]:
    """Row 0 unpadded (the longest clip), the others padded by up to a third of the width."""
    return [0] + torch.randint(0, max(1, width // 3), (batch - 1,), generator=gen).tolist()


def check_sdpa(widths: list[int], batch: int, device: str) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for w in widths:
        pads = pads_for(batch, w, gen)
        q = torch.randn(batch, 4, w, 256, generator=gen)
        k = torch.randn(batch, 1, w, 256, generator=gen)
        v = torch.randn(batch, 1, w, 256, generator=gen)
        real = torch.arange(w)[None, :] >= torch.tensor(pads)[:, None]  # (B, W)
        causal = torch.ones(w, w, dtype=torch.bool).tril()
        mask = causal[None, None] & real[:, None, None, :]  # (B, 1, W, W)
        ref = F.scaled_dot_product_attention(q.double(), k.double().expand(-1, 4, -1, -1), v.double().expand(-1, 4, -1, -1),
                                             attn_mask=mask, scale=256**-0.5)
        got = F.scaled_dot_product_attention(q.to(device), k.to(device), v.to(device), attn_mask=mask.to(device),
                                             scale=256**-0.5, enable_gqa=True).double().cpu()
        rows = real[:, None, :, None].expand_as(ref)  # the real query positions of each row
        err = (got - ref).abs().masked_fill(~rows, 0).amax(dim=(1, 2, 3))
        out.append({"width": w, "max_err": float(err.max()), "rows_bad": int((err > 1e-3).sum()),
                    "nan": bool(torch.isnan(got.masked_fill(~rows, 0)).any())})
    return out


def check_sdpa_as_transformers(widths: list[int], batch: int, device: str, contiguous_q: bool) -> list[dict]:
    """As transformers' sdpa_attention_forward calls it with a mask: q a transposed (B, W, H, D)
    view, k / v repeated to the query heads (repeat_kv), no enable_gqa."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for w in widths:
        pads = pads_for(batch, w, gen)
        q = torch.randn(batch, w, 4, 256, generator=gen).to(device).transpose(1, 2)
        k = torch.randn(batch, w, 1, 256, generator=gen).to(device).transpose(1, 2)
        v = torch.randn(batch, w, 1, 256, generator=gen).to(device).transpose(1, 2)
        k4, v4 = (t[:, :, None].expand(batch, 1, 4, w, 256).reshape(batch, 4, w, 256) for t in (k, v))
        q = q.contiguous() if contiguous_q else q
        real = torch.arange(w)[None, :] >= torch.tensor(pads)[:, None]
        mask = torch.ones(w, w, dtype=torch.bool).tril()[None, None] & real[:, None, None, :]
        ref = F.scaled_dot_product_attention(q.double().cpu(), k4.double().cpu(), v4.double().cpu(), attn_mask=mask, scale=256**-0.5)
        got = F.scaled_dot_product_attention(q, k4, v4, attn_mask=mask.to(device), scale=256**-0.5).double().cpu()
        rows = real[:, None, :, None].expand_as(ref)
        err = (got - ref).abs().masked_fill(~rows, 0).amax(dim=(1, 2, 3))
        out.append({"width": w, "max_err": float(err.max()), "rows_bad": int((err > 1e-3).sum())})
    return out


def _model(family: str, impl: str, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "gemma3":
        from transformers import Gemma3TextConfig, Gemma3TextModel

        model = Gemma3TextModel(Gemma3TextConfig(**GEMMA_270M, attn_implementation="sdpa" if impl == attention.NAME else impl))
        if impl == attention.NAME:  # stcompress's fix: transformers' sdpa, K/V materialised
            attention.register()
            model.config._attn_implementation = attention.NAME
        return model.to(device).eval()
    from transformers import Qwen2Config, Qwen2Model

    gqa = family == "qwen2-gqa"  # Qwen2-Audio-7B's LM has 32 KV heads (no GQA); a GQA Qwen2 too
    cfg = Qwen2Config(hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=2 if gqa else 8, vocab_size=1024, attn_implementation=impl)
    return Qwen2Model(cfg).to(device).eval()


def check_model(widths: list[int], batch: int, device: str, impl: str, family: str = "gemma3",
                align: int = 1) -> list[dict]:
    """`align`: left-pad every batch to a multiple of this width (the engine's fix)."""
    model = _model(family, impl, device)
    hidden = model.config.hidden_size
    gen = torch.Generator().manual_seed(1)
    out = []
    for w in widths:
        extra = -w % align
        pads = [p + extra for p in pads_for(batch, w, gen)]
        w += extra
        embeds = torch.randn(batch, w, hidden, generator=gen).to(device)
        mask = (torch.arange(w)[None, :] >= torch.tensor(pads)[:, None]).long().to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            last = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).last_hidden_state[:, -1]
            errs = []
            for i in range(batch):
                p = pads[i]
                alone = model(inputs_embeds=embeds[i : i + 1, p:], attention_mask=mask[i : i + 1, p:],
                              position_ids=positions[i : i + 1, p:]).last_hidden_state[0, -1]
                errs.append(float((last[i] - alone).abs().max() / alone.abs().max()))
        bad = [i for i, e in enumerate(errs) if not e < 1e-3]
        out.append({"width": w - extra, "run_width": w, "max_rel_err": max(errs), "rows_bad": len(bad), "bad_rows_sample": bad[:8],
                    "row0_rel_err": errs[0]})
    return out


def check_decode(widths: list[int], batch: int, device: str, impl: str) -> list[dict]:
    """One decode step whose key length is `width` (prefill of width - 1, then one token), batched
    and left-padded against each row alone: does the fault reach decode steps (query length 1)?"""
    model = _model("gemma3", impl, device)
    gen = torch.Generator().manual_seed(2)
    out = []
    for w in widths:
        pads = pads_for(batch, w - 1, gen)
        embeds = torch.randn(batch, w, 640, generator=gen).to(device)
        mask = (torch.arange(w)[None, :] >= torch.tensor(pads)[:, None]).long().to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)

        def step(e: torch.Tensor, m: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
            pre = model(inputs_embeds=e[:, :-1], attention_mask=m[:, :-1], position_ids=pos[:, :-1], use_cache=True)
            return model(inputs_embeds=e[:, -1:], attention_mask=m, position_ids=pos[:, -1:],
                         past_key_values=pre.past_key_values, use_cache=True).last_hidden_state[:, -1]

        with torch.no_grad():
            last = step(embeds, mask, positions)
            errs = []
            for i in range(batch):
                p = pads[i]
                alone = step(embeds[i : i + 1, p:], mask[i : i + 1, p:], positions[i : i + 1, p:])[0]
                errs.append(float((last[i] - alone).abs().max() / alone.abs().max()))
        out.append({"width": w, "max_rel_err": max(errs), "rows_bad": sum(not e < 1e-3 for e in errs)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--batch", type=int, default=150)
    ap.add_argument("--model-batch", type=int, default=24)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    widths = [63, 64, 65, 66, 84, 95, 96, 97, 98, 124, 128, 129, 130, 147, 161]
    start = time.perf_counter()
    report = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor(),
        "torch": torch.__version__,
        "sdpa": check_sdpa(widths, args.batch, args.device),
    }
    import transformers

    report["transformers"] = transformers.__version__
    for contiguous in (False, True):
        report[f"sdpa_as_transformers_{'contiguous_q' if contiguous else 'strided_q'}"] = check_sdpa_as_transformers(
            widths, args.batch, args.device, contiguous)
    for impl in ("sdpa", "eager", attention.NAME):
        report[f"model_{impl}"] = check_model(widths, args.model_batch, args.device, impl)
    for impl in ("sdpa", attention.NAME):
        report[f"decode_{impl}"] = check_decode(widths, args.model_batch, args.device, impl)
    report["model_sdpa_align8"] = check_model(widths, args.model_batch, args.device, "sdpa", align=8)
    for family in ("qwen2", "qwen2-gqa"):
        report[f"{family}_sdpa"] = check_model(widths, args.model_batch, args.device, "sdpa", family=family)
    report["seconds"] = round(time.perf_counter() - start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    for key in [k for k, v in report.items() if isinstance(v, list)]:
        print(key, [(r["width"], r["rows_bad"]) for r in report[key]])


if __name__ == "__main__":
    main()
