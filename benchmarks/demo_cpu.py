"""Wall time of `stcompress demo` (the README's first command) and the numbers in its report.

Runs the demo from scratch in a subprocess (`--fresh`, so no stage is skipped; the demo base model
and tokenizer caches are kept, as after the first run on a machine) and records the total, each
stage's seconds (plan.json), the report table's rows (scores.json per evaluation) and the test
voice's scores on seen / never-seen sentences.

    python benchmarks/demo_cpu.py --lang de --out benchmarks/results/demo_cpu_de.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lang", default="de", choices=["de", "zh"])
    p.add_argument("--run-dir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    run_dir = args.run_dir or Path(f"runs/demo-bench-{args.lang}")
    cmd = [sys.executable, "-m", "stcompress.cli", "demo", "-q", "--fresh", "--target-lang", args.lang, "--run-dir", str(run_dir)]
    load_before = os.getloadavg()
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    plan = json.loads((run_dir / "plan.json").read_text())
    rows = {}
    for name in ("teacher-eval", "pruned-eval", "final-eval"):
        s = json.loads((run_dir / name / "scores.json").read_text())
        rows[name] = {"scores": {k: round(v["score"], 2) for k, v in s["scores"].items()},
                      "model": {k: s.get("model", {}).get(k) for k in ("decoder_layers", "parameters", "bytes_on_disk")},
                      "segments_per_s": round(s["speed"]["segments_per_s"], 1)}
    result = {
        "command": " ".join(cmd), "wall_s": round(wall, 1),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "loadavg_before": load_before,
                    "loadavg_after": os.getloadavg()},
        "stage_seconds": {k: round(v.get("seconds") or 0.0, 1) for k, v in plan["stages"].items()},
        "evaluations": rows,
        "seen_vs_new": json.loads((run_dir / "demo_scores.json").read_text())["seen_vs_new"],
    }
    text = json.dumps(result, indent=1, ensure_ascii=False)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
