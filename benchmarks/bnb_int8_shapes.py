"""Which layer shapes bitsandbytes' CUDA int8 matmul (LLM.int8, cuBLASLt) runs, by output features
and batch rows: the measurement behind quantize.INT8_OUT_MULTIPLE and vocab_trim.ROW_MULTIPLE.

    PYTHONPATH=src:<site with bitsandbytes> python benchmarks/bnb_int8_shapes.py --out $OUT/bnb_int8_shapes.json

Found by the testbed's sweep on an H200 (2026-12-03): the untrimmed teacher exported to int8 with
an int8 LM head (35,935 rows) passed its 2-clip reload check, then every evaluation at batch 150
failed with "cublasLt ran into an error!". bitsandbytes 0.50.2 checks only the inner dimension
(falls back to fp32 when it is not a multiple of 4); the output dimension reaches cuBLASLt as is.

Each row: one `bnb.nn.Linear8bitLt` (640 inputs, the testbed's hidden size, or 4096, the 7B's)
with random int8 weights, called on bf16 batches of 1 .. 256 rows in turn; "ok" or the error's
first line. GPU only (the CPU backend does not use cuBLASLt).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings
from pathlib import Path

import torch

SHAPES = [(o, 640) for o in (12091, 12092, 12096, 35933, 35934, 35935, 35936, 65535, 65536)] + \
    [(o, 4096) for o in (35935, 35936, 156031, 156032)]  # (out, in): the testbed's hidden size, the 7B's
ROWS = (1, 16, 64, 96, 100, 128, 150, 256)


def row(bnb, out_f: int, in_f: int) -> dict[str, str]:
    """One layer, called on each batch size in turn: "ok" or the error's first line."""
    layer = bnb.nn.Linear8bitLt(in_f, out_f, bias=False, has_fp16_weights=False, threshold=6.0)
    layer.weight = bnb.nn.Int8Params(torch.randn(out_f, in_f, dtype=torch.float16), requires_grad=False,
                                     has_fp16_weights=False)
    layer = layer.cuda()  # quantized to int8 here
    out = {}
    for rows in ROWS:
        x = torch.randn(rows, in_f, dtype=torch.bfloat16, device="cuda")
        try:
            with torch.no_grad():
                layer(x)
            torch.cuda.synchronize()
            out[str(rows)] = "ok"
        except RuntimeError as exc:
            out[str(rows)] = str(exc).splitlines()[0]
    del layer
    torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bnb_int8_shapes: needs a CUDA GPU (the CPU backend has no cuBLASLt path)")
    import bitsandbytes as bnb

    warnings.filterwarnings("ignore")
    t0 = time.time()
    results = {}
    for out_f, in_f in SHAPES:
        results[f"{out_f}x{in_f}"] = row(bnb, out_f, in_f)
        print(f"{out_f:>7} x {in_f:<5}", " ".join(f"{r}:{'ok' if v == 'ok' else 'ERR'}"
                                                  for r, v in results[f"{out_f}x{in_f}"].items()), flush=True)
    failing = sorted({int(k.split("x")[0]) for k, v in results.items() if any(c != "ok" for c in v.values())})
    record = {"command": "python benchmarks/bnb_int8_shapes.py --out OUT", "gpu": torch.cuda.get_device_name(0),
              "torch": torch.__version__, "bitsandbytes": bnb.__version__, "python": platform.python_version(),
              "rows": list(ROWS), "results": results, "out_features_failing": failing,
              "all_failing_unaligned": all(f % 4 for f in failing),
              "seconds": round(time.time() - t0, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1))
    print(json.dumps({k: v for k, v in record.items() if k != "results"}))


if __name__ == "__main__":
    main()
