"""The importance search on one GPU and spread over two (torchrun): the same candidates, the same scores?

    python benchmarks/multi_gpu_importance.py --work /tmp/mg --out result.json
Uses the built-in tiny model (fp32) and the built-in example; every process takes every
world-th candidate of a round and picks its device from LOCAL_RANK.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def search(work: Path, name: str, launcher: list[str], device: list[str]) -> list:
    out = work / name
    args = ["-m", "stcompress", "importance", "--model.path", "builtin:tiny-random", "--model.dtype", "float32",
            "--data.limit", "6", "--rounds", "2", "--protect", "0", "--generation.max-new-tokens", "8",
            "--output", str(out), "-q", *device]
    done = subprocess.run([*launcher, *args], capture_output=True, text=True, env=os.environ.copy())
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "candidates.jsonl").read_text().splitlines()]
    return [(r["round"], r["layer"], r["scores"]) for r in rows]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    one = search(args.work, "one", [sys.executable], ["--model.device", "cuda:0"])
    again = search(args.work, "one-again", [sys.executable], ["--model.device", "cuda:0"])
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    launcher = [torchrun, "--nproc_per_node", "2"] if Path(torchrun).exists() else [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    two = search(args.work, "two", launcher, [])
    manifest = json.loads((args.work / "two" / "manifest.json").read_text())
    def differences(a: list, b: list) -> list:
        return [{"round": x[0], "layer": x[1], "a": x[2], "b": y[2]} for x, y in zip(a, b) if x != y]

    record = {"evaluations": len(one), "identical": one == two, "one_gpu_twice_identical": one == again,
              "differences_two_vs_one": differences(one, two), "differences_one_vs_one_again": differences(one, again), "world_size": manifest["world_size"],
              "removal_order": manifest["removal_order"],
              "rank_files": sorted(p.name for p in (args.work / "two").glob("candidates.rank*.jsonl"))}
    print(json.dumps(record, indent=1))
    args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
