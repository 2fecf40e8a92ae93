"""Rebuild every evaluated system of a run on this machine and compare with the GPU scores.

    PYTHONPATH=src python benchmarks/testbed/rebuild_check.py --base runs/testbed/base \
        --artifacts benchmarks/testbed/results/de-run2 --data-dir runs/testbed-data/de --work runs/rebuilt-de

For each evaluate stage in the artifacts whose model is a rebuildable stage (teacher-eval,
final25-eval, ...): `python -m stcompress.testbed rebuild` of that model into WORK/<model>, then
`stcompress evaluate` with the recorded evaluation's own settings (prompt, generation, metrics, data
options) on the manifest it recorded (--data-dir: the same file name in that folder), then the scores and greedy outputs against the recorded
ones. Writes ARTIFACTS/rebuild-check.md and .json (or --report FILE.md). Finished rebuilds and
evaluations in WORK are reused, so a killed check continues.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from stcompress.artifacts import atomic_write_text, read_manifest
from stcompress.config import EvaluateConfig, load_config
from stcompress.errors import StcompressError
from stcompress.testbed.rebuild import rebuild, recorded_stage

TOLERANCE = 0.5  # corpus chrF points, per system (benchmarks/testbed/README.md)


def evaluated_systems(artifacts: Path) -> dict[str, str]:
    """evaluate stage -> the model stage it scored, for every evaluation of a rebuildable model."""
    out = {}
    for d in sorted(p for p in artifacts.iterdir() if (p / "manifest.json").is_file()):
        m = read_manifest(d)
        if m.get("stage") != "evaluate" or not (m.get("config") or {}).get("model", {}).get("path"):
            continue
        model = recorded_stage(artifacts, m["config"]["model"]["path"])
        if model and read_manifest(artifacts / model).get("stage") in ("export", "prune", "finetune"):
            out[d.name] = model
    return out


def _hyps(path: Path) -> dict[str, str]:
    return {r["id"]: r["hypothesis"] for r in map(json.loads, path.read_text(encoding="utf-8").splitlines()) if r}


def check(base: Path, artifacts: Path, work: Path, data_dir: Path | None, device: str = "cpu") -> list[dict[str, Any]]:
    from stcompress.stages import evaluate

    rows = []
    for ev, model in evaluated_systems(artifacts).items():
        recorded = read_manifest(artifacts / ev)
        target = work / model
        if not (target / "manifest.json").is_file():
            known = {d.name: d for d in work.iterdir() if (d / "NOTICE").is_file()} if work.is_dir() else {}
            rebuild(base, artifacts, model, target, device=device, known=known)
        out = work / f"{ev}"
        if not (out / "scores.json").is_file():
            cfg = dict(recorded["config"])
            cfg |= {"output": str(out), "hypotheses": None, "model": dict(cfg["model"], path=str(target), device=device,
                                                                          dtype="float32"),
                    "data": dict(cfg["data"], **({"dataset": str(data_dir / Path(cfg["data"]["dataset"]).name)}
                                                 if data_dir and not cfg["data"]["dataset"].startswith("builtin") else {}))}
            evaluate.run(load_config(EvaluateConfig, cfg), progress=False)
        mine = json.loads((out / "scores.json").read_text(encoding="utf-8"))["scores"]
        gpu = json.loads((artifacts / ev / "scores.json").read_text(encoding="utf-8"))["scores"]
        a, b = _hyps(out / "hypotheses.jsonl"), _hyps(artifacts / ev / "hypotheses.jsonl")
        same = sum(a.get(k) == v for k, v in b.items())
        delta = {k: round(mine[k]["score"] - gpu[k]["score"], 3) for k in gpu if k in mine}
        rows.append({"evaluation": ev, "model": model, "rebuilt": {k: v["score"] for k, v in mine.items()},
                     "recorded": {k: v["score"] for k, v in gpu.items()}, "delta": delta,
                     "identical_outputs": same, "segments": len(b),
                     "within_tolerance": abs(delta.get("chrf", 0.0)) <= TOLERANCE})
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [f"# Rebuilt on CPU vs recorded (tolerance: |delta chrF| <= {TOLERANCE})", "",
             "| evaluation | model | chrF rebuilt | chrF recorded | delta chrF | delta chrF++ | delta BLEU | identical outputs | ok |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d = r["delta"]
        lines.append(f"| {r['evaluation']} | {r['model']} | {r['rebuilt'].get('chrf', 0):.2f} | {r['recorded'].get('chrf', 0):.2f} | "
                     f"{d.get('chrf', 0):+.2f} | {d.get('chrf++', 0):+.2f} | {d.get('bleu', 0):+.2f} | "
                     f"{r['identical_outputs']}/{r['segments']} | {'yes' if r['within_tolerance'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--artifacts", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True, help="where the rebuilt models and their evaluations go")
    ap.add_argument("--data-dir", type=Path, default=None, help="folder holding the manifests the evaluations recorded "
                    "(default: their recorded paths)")
    ap.add_argument("--report", type=Path, default=None, help="FILE.md (default ARTIFACTS/rebuild-check.md)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    try:
        rows = check(args.base, args.artifacts, args.work, args.data_dir, args.device)
    except StcompressError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report = args.report or args.artifacts / "rebuild-check.md"
    atomic_write_text(report.with_suffix(".json"), json.dumps(rows, indent=2) + "\n")
    atomic_write_text(report, markdown(rows))
    print(markdown(rows))
    return 0 if all(r["within_tolerance"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
