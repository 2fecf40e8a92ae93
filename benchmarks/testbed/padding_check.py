"""Left-padded batched attention vs each row alone, on the testbed's decoder (Gemma 3 270M shape).

zh-run1 (benchmarks/testbed/results/README.md) decoded whole batches to garbage on the GPU while
the same model and clips decode correctly on a CPU. The broken batches had prompt widths 65, 97
and 129 (1 more than a multiple of 32); the sound ones 84, 93, 95, 98, 101, 105, 112, 124, 147.
This checks the suspects with random weights (nothing to download or carry):

  sdpa*   torch's scaled_dot_product_attention on the decoder's shapes (4 query heads, 1 KV head,
          head_dim 256, fp32) with a left-padded causal boolean mask, against a float64 CPU
          reference on the rows' real positions: K/V contiguous with enable_gqa, and K/V as
          transformers passes them (repeat_kv of one KV head: a stride-0 view), q strided or not;
  model_* Gemma3TextModel (the testbed config, random weights, fp32) called as the translation
          engine calls it (inputs_embeds, 2-D mask, positions from the mask): each row's last
          hidden state in the padded batch against the row alone, for sdpa, eager and
          stcompress's sdpa_materialised_kv; also batches left-padded to a multiple of 8, and
          Qwen2 decoders with 8 and 2 KV heads;
  decode_* one decode step (query length 1) after the prefill, the same comparison.

    PYTHONPATH=src python benchmarks/testbed/padding_check.py --out $OUT/padding_check.json --model-batch 32   # GPU, ~3 min
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from stcompress.model import arch, attention

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


def _left_padded(pads: list[int], width: int) -> torch.Tensor:
    """(B, W) bool: True on each row's real positions."""
    return torch.arange(width)[None, :] >= torch.tensor(pads)[:, None]


def check_sdpa(widths: list[int], batch: int, device: str, layout: str) -> list[dict]:
    """layout "gqa": K/V contiguous with one head, enable_gqa; "transformers" / "transformers-contiguous-q":
    as transformers' sdpa_attention_forward calls it with a mask (q a transposed (B, W, H, D) view
    or made contiguous, K/V repeat_kv'd to the query heads: a stride-0 view)."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for w in widths:
        pads = pads_for(batch, w, gen)
        q = torch.randn(batch, w, 4, 256, generator=gen).to(device).transpose(1, 2)
        k, v = (torch.randn(batch, w, 1, 256, generator=gen).to(device).transpose(1, 2) for _ in range(2))
        if layout == "gqa":
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
            extra = {"enable_gqa": True}
        else:
            k, v = (t[:, :, None].expand(batch, 1, 4, w, 256).reshape(batch, 4, w, 256) for t in (k, v))
            q = q.contiguous() if layout == "transformers-contiguous-q" else q
            extra = {}
        real = _left_padded(pads, w)
        mask = torch.ones(w, w, dtype=torch.bool).tril()[None, None] & real[:, None, None, :]  # (B, 1, W, W)
        ref = F.scaled_dot_product_attention(q.double().cpu(), k.double().cpu().expand(-1, 4, -1, -1),
                                             v.double().cpu().expand(-1, 4, -1, -1), attn_mask=mask, scale=256**-0.5)
        got = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(device), scale=256**-0.5, **extra).double().cpu()
        rows = real[:, None, :, None].expand_as(ref)  # the real query positions of each row
        err = (got - ref).abs().masked_fill(~rows, 0).amax(dim=(1, 2, 3))
        out.append({"width": w, "max_err": float(err.max()), "rows_bad": int((err > 1e-3).sum()),
                    "nan": bool(torch.isnan(got.masked_fill(~rows, 0)).any())})
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


Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _against_rows_alone(widths: list[int], batch: int, device: str, model: torch.nn.Module, forward: Forward,
                        pad_to: Callable[[int], int], seed: int, align: int = 1) -> list[dict]:
    """forward(embeds, mask, positions) -> last hidden state per row, on the left-padded batch and
    on each row alone; `pad_to(w)`: the width the padding is drawn for; `align`: left-pad every
    batch to a multiple of this width."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for w in widths:
        extra = -w % align
        pads = [p + extra for p in pads_for(batch, pad_to(w), gen)]
        run = w + extra
        embeds = torch.randn(batch, run, model.config.hidden_size, generator=gen).to(device)
        mask = _left_padded(pads, run).long().to(device)
        positions = arch.mask_positions(mask)
        with torch.no_grad():
            last = forward(embeds, mask, positions)
            errs = []
            for i, p in enumerate(pads):
                alone = forward(embeds[i : i + 1, p:], mask[i : i + 1, p:], positions[i : i + 1, p:])[0]
                errs.append(float((last[i] - alone).abs().max() / alone.abs().max()))
        bad = [i for i, e in enumerate(errs) if not e < 1e-3]
        out.append({"width": w, "run_width": run, "max_rel_err": max(errs), "rows_bad": len(bad),
                    "bad_rows_sample": bad[:8], "row0_rel_err": errs[0]})
    return out


def check_model(widths: list[int], batch: int, device: str, impl: str, family: str = "gemma3",
                align: int = 1) -> list[dict]:
    """Prefill: the batch's last hidden states against each row alone."""
    model = _model(family, impl, device)

    def prefill(e: torch.Tensor, m: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return model(inputs_embeds=e, attention_mask=m, position_ids=pos).last_hidden_state[:, -1]

    return _against_rows_alone(widths, batch, device, model, prefill, pad_to=lambda w: w, seed=1, align=align)


def check_decode(widths: list[int], batch: int, device: str, impl: str) -> list[dict]:
    """One decode step whose key length is `width` (prefill of width - 1, then one token), batched
    and left-padded against each row alone: does the fault reach decode steps (query length 1)?"""
    model = _model("gemma3", impl, device)

    def step(e: torch.Tensor, m: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        pre = model(inputs_embeds=e[:, :-1], attention_mask=m[:, :-1], position_ids=pos[:, :-1], use_cache=True)
        return model(inputs_embeds=e[:, -1:], attention_mask=m, position_ids=pos[:, -1:],
                     past_key_values=pre.past_key_values, use_cache=True).last_hidden_state[:, -1]

    return _against_rows_alone(widths, batch, device, model, step, pad_to=lambda w: w - 1, seed=2)


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
        "sdpa": check_sdpa(widths, args.batch, args.device, "gqa"),
    }
    import transformers

    report["transformers"] = transformers.__version__
    report["sdpa_as_transformers_strided_q"] = check_sdpa(widths, args.batch, args.device, "transformers")
    report["sdpa_as_transformers_contiguous_q"] = check_sdpa(widths, args.batch, args.device, "transformers-contiguous-q")
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
