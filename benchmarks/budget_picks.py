"""What `--size-budget` picks for the Qwen2-Audio-7B architecture (predicted sizes only, CPU, seconds).

    python benchmarks/budget_picks.py [--formats none,int8,nf4,hqq] [--budgets 4GB,2GB,1GB] [--measure both]
        [--vocab-rows 4008]

Uses stcompress.budget on the 7B config (meta device, no weights) with an importance order that
removes the middle layers first (any order gives the same sizes: the layers are identical in
shape) and layers 0 and 31 protected, as the paper's search does. The real picks need the real
importance order; the sizes do not.

Printed on CPU (predictions; rule of stcompress.budget; default budget_min_bits 2):
- transformers 5.x (none, int8, nf4), either measure: 32 layers fit no budget of 4 GB or less;
  with the importance order, 4 GB -> 19 layers, nf4 with LM head and audio tower in NF4 too
  (3.943 GB); 2 GB and 1 GB: nothing (the bf16 embedding alone is 1.28 GB).
- transformers 4.57 with hqq, `--measure both`: the same picks (HQQ reloads in fp32, so its
  torch.save count is ~1.5x its files); `--measure safetensors`: 4 GB -> 32 layers, hqq decoder
  2-bit, LM head 4, audio tower 2 (3.886 GB files, 5.675 GB torch.save); 2 GB -> 4 layers at
  2-bit (1.954 GB); 1 GB: nothing. The rule keeps layers before bits, so budget_min_bits 3 is the
  knob for quality; vocabulary trimming is what opens the 1-2 GB bin to a deep model.
"""

from __future__ import annotations

import argparse

from qwen2audio_7b import config

from stcompress import budget


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--formats", default="none,int8,nf4,hqq")
    parser.add_argument("--budgets", default="4GB,2GB,1GB")
    parser.add_argument("--measure", default="both", choices=budget.MEASURES)
    parser.add_argument("--vocab-rows", type=int, default=None,
                        help="size every candidate with a vocabulary trimmed to this many rows (export --trim-vocab)")
    args = parser.parse_args()
    cfg = config("7b")
    formats = tuple(args.formats.split(","))
    table = budget.SizeTable(cfg, "bfloat16", 64)
    order = sorted(range(1, 31), key=lambda i: abs(i - 15.5))
    present = list(range(32))
    for label, layers in (("all 32 layers", [(0, [])]), ("importance order", budget.layer_options(order, present))):
        space = list(budget.candidates(table, formats, {}, layers, 32, (args.vocab_rows,)))
        for text in args.budgets.split(","):
            best = budget.choose(space, budget.parse_size(text), args.measure, formats)
            shown = "nothing fits" if best is None else (
                f"{best.describe()}: {budget.show_size(best.predicted)} files, "
                f"{budget.show_size(best.predicted_torch_save)} torch.save")
            print(f"{label:>17} | {text:>5} | {shown}")


if __name__ == "__main__":
    main()
