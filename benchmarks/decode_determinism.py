"""Where do greedy decodes of the same model diverge on the GPU: run to run, graph vs eager, ours vs transformers?

For each pair of decoding paths, prints per segment the first step at which the tokens differ
(-1: never) and the largest logit difference of the first decode step.

    python benchmarks/decode_determinism.py --arch 7b --out results.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from qwen2audio_7b import build, clips  # noqa: E402

from stcompress.config import GenerationConfig  # noqa: E402
from stcompress.data.example import Example  # noqa: E402
from stcompress.model import arch, static_decode  # noqa: E402
from stcompress.translate import Translator  # noqa: E402

EOS = {151645, 151643}


def first_divergence(a: torch.Tensor, b: torch.Tensor) -> list[int]:
    n = min(a.shape[1], b.shape[1])
    out = []
    for row_a, row_b in zip(a[:, :n].tolist(), b[:, :n].tolist()):
        out.append(next((i for i, (x, y) in enumerate(zip(row_a, row_b)) if x != y), -1))
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--arch", choices=["7b", "tiny"], default="7b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--head-scale", type=float, default=64.0)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model, processor, _ = build(args.arch, args.device, dtype)
    arch.lm_head(model).weight.data.mul_(args.head_scale)
    examples = [Example(id=f"s{i}", audio=a, target_lang="de") for i, a in enumerate(clips(8, 8.0))]
    translator = Translator(model, processor, generation=GenerationConfig(max_new_tokens=args.new_tokens, batch_size=8), progress=False)
    cache = translator.encode(examples)
    embeds, mask = translator.build_inputs(examples, cache)
    decoder, head = arch.text_model(model), arch.lm_head(model)

    def static(graph: bool) -> torch.Tensor:
        positions = arch.mask_positions(mask)
        out = decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True)
        first = head(out.last_hidden_state[:, -1]).argmax(-1)
        return static_decode.StaticGreedy(model, out.past_key_values, mask, positions, args.new_tokens, EOS, 151643,
                                          cuda_graph=graph).run(first)

    slow = Translator(model, processor, generation=GenerationConfig(max_new_tokens=args.new_tokens, static_cache=False),
                      progress=False)

    def transformers_steps() -> torch.Tensor:
        return slow._greedy(embeds, mask, args.new_tokens, EOS, 151643)

    runs = {"graph": static(True), "graph_again": static(True), "eager": static(False), "eager_again": static(False),
            "transformers": transformers_steps(), "transformers_again": transformers_steps()}
    pairs = [("graph", "graph_again"), ("eager", "eager_again"), ("transformers", "transformers_again"),
             ("graph", "eager"), ("eager", "transformers")]
    record = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu", "arch": args.arch,
              "head_scale": args.head_scale, "new_tokens": args.new_tokens,
              "first_divergence": {f"{a}~{b}": first_divergence(runs[a], runs[b]) for a, b in pairs}}
    print(json.dumps(record, indent=1))
    args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
