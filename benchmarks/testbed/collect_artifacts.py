"""Pack what a testbed run must keep (issue 10, point 5) into <= 4 files of <= 16 MB.

    python benchmarks/testbed/collect_artifacts.py runs/testbed-de --out "$OUT" --name testbed-de

Writes NAME-artifacts.tar.gz (and -2 .. -4 only when needed): unpacked together into one folder
(`benchmarks/testbed/results/<lang>-run2/`) they give the layout `python -m stcompress.testbed
rebuild --artifacts` reads, plus everything needed to recompute the scores:
- projector.safetensors: the projector of the frozen-LM warm-up the teacher starts from (fp32,
  metadata `stage`); other warm-ups' projectors as <stage>/projector.safetensors;
- <stage>/adapter/: every LoRA / QLoRA adapter, its tensors cast to fp16 (exactly representable
  values are kept; a tensor fp16 cannot hold stays fp32);
- every stage's small files: manifest.json, history.jsonl, scores.json, hypotheses.jsonl,
  examples.jsonl (KD), the importance search's removal order, candidates, proxies and hypotheses,
  model cards and configs, the report; plan.json and the run's log if given.
Never a model's weights (*.safetensors other than the above), checkpoints or audio.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
import tempfile
from pathlib import Path

MAX_BYTES = 16_000_000
MAX_FILES = 4  # 4 x 16 MB: what one device call brings back (8 files, 64 MiB)
BUDGET = 15_500_000  # per volume, by the sum of per-file compressed sizes
SMALL = (".json", ".jsonl", ".tsv", ".txt", ".md", ".html", ".png", ".svg", ".yaml", ".log")
SKIP_DIRS = {"model", "checkpoints", "audio", "cache"}  # and <stage>.checkpoints, staging dirs (.*)
SKIP_FILES = {"tokenizer.json"}  # 2-5 MB in every model dir; the base model rebuilds it


def _manifest(d: Path) -> dict:
    try:
        return json.loads((d / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def _frozen_lm_warmup(m: dict) -> bool:
    cfg = m.get("config") or {}
    return m.get("stage") == "finetune" and cfg.get("mode") == "full" and bool((cfg.get("train") or {}).get("freeze_language_model"))


def _stage_of(path: str | None) -> str | None:
    if not path:
        return None
    p = Path(path)
    return (p.parent if p.name in ("model", "adapter") else p).name


def projectors(run: Path) -> dict[str, bytes]:
    """arcname -> safetensors bytes of each frozen-LM warm-up's projector; the one another kind of
    stage starts from (the teacher's base) goes to the top level."""
    from safetensors import safe_open
    from safetensors.torch import save

    stages = {d.name: _manifest(d) for d in sorted(run.iterdir()) if d.is_dir() and (d / "manifest.json").is_file()}
    warmups = [n for n, m in stages.items() if _frozen_lm_warmup(m) and (run / n / "model").is_dir()]
    used = {_stage_of(m.get("base_model")) for n, m in stages.items() if n not in warmups}
    out = {}
    for name in warmups:
        tensors = {}
        for f in sorted((run / name / "model").glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                tensors |= {k: h.get_tensor(k) for k in h.keys() if "multi_modal_projector." in k}
        arc = "projector.safetensors" if name in used and sum(w in used for w in warmups) == 1 else f"{name}/projector.safetensors"
        out[arc] = save(tensors, metadata={"stage": name})
    return out


def fp16_adapter(path: Path) -> bytes:
    import torch
    from safetensors.torch import load_file, save

    tensors = load_file(str(path))
    cast = {}
    for k, v in tensors.items():
        half = v.to(torch.float16) if v.dtype == torch.float32 else v
        cast[k] = half if torch.isfinite(half).all() or not torch.isfinite(v).all() else v
    return save(cast, metadata={"cast": "float16 (stcompress collect_artifacts)"})


def small_files(run: Path) -> dict[str, Path]:
    out = {}
    for f in sorted(run.rglob("*")):
        rel = f.relative_to(run)
        if not f.is_file() or f.name.startswith(".") or f.name in SKIP_FILES \
                or any(p in SKIP_DIRS or p.startswith(".") or p.endswith(".checkpoints") for p in rel.parts[:-1]):
            continue
        if f.suffix in SMALL and f.stat().st_size <= 4_000_000:
            out[str(rel)] = f
    return out


def collect(run: Path, extra: list[Path]) -> dict[str, bytes]:
    files = {arc: p.read_bytes() for arc, p in small_files(run).items()}
    files |= projectors(run)
    for cfg in sorted(run.glob("*/adapter/adapter_config.json")):
        adapter = cfg.parent
        files[str(cfg.relative_to(run))] = cfg.read_bytes()
        weights = adapter / "adapter_model.safetensors"
        if weights.is_file():
            files[str(weights.relative_to(run))] = fp16_adapter(weights)
    for f in extra:
        if f.is_file():
            files[f.name] = f.read_bytes()
    return files


def pack(files: dict[str, bytes], out: Path, name: str) -> list[Path]:
    """Volumes of <= MAX_BYTES compressed, at most MAX_FILES; each written whole (temp name, rename)."""
    import gzip

    def tar_bytes(arcs: list[str]) -> bytes:
        buf = io.BytesIO()
        with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
            for arc in sorted(arcs):
                info = tarfile.TarInfo(arc)
                info.size, info.mtime = len(files[arc]), 0
                tar.addfile(info, io.BytesIO(files[arc]))
        return buf.getvalue()

    estimate = {arc: len(gzip.compress(data, 6)) + 512 for arc, data in files.items()}  # + a tar header
    volumes: list[list[str]] = []
    for arc in sorted(files, key=lambda a: -estimate[a]):  # first fit, largest first
        if estimate[arc] > BUDGET:
            raise SystemExit(f"error: {arc} alone is over {BUDGET} bytes compressed; it cannot be carried")
        vol = next((v for v in volumes if sum(estimate[a] for a in v) + estimate[arc] <= BUDGET), None)
        if vol is None:
            volumes.append(vol := [])
        vol.append(arc)
    if len(volumes) > MAX_FILES:
        raise SystemExit(f"error: the artifacts need {len(volumes)} files of <= {MAX_BYTES} bytes, more than {MAX_FILES}; "
                         f"largest: {sorted(files, key=lambda a: -estimate[a])[:3]}")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i, vol in enumerate(volumes):
        path = out / f"{name}-artifacts{'' if i == 0 else f'-{i + 1}'}.tar.gz"
        data = tar_bytes(vol)
        if len(data) > MAX_BYTES:  # a whole volume compresses at least as well as its parts; checked anyway
            raise SystemExit(f"error: {path.name} came out at {len(data)} bytes, over {MAX_BYTES}")
        with tempfile.NamedTemporaryFile(dir=out, prefix=f".{path.name}.", delete=False) as tmp:
            tmp.write(data)
        Path(tmp.name).replace(path)
        written.append(path)
        print(f"{path}  {path.stat().st_size} bytes  {len(vol)} files")
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--name", required=True, help="file name prefix, e.g. testbed-de")
    ap.add_argument("--extra", type=Path, nargs="*", default=[], help="more small files (the run's log)")
    args = ap.parse_args(argv)
    if not args.run_dir.is_dir():
        print(f"error: {args.run_dir} is not a run directory", file=sys.stderr)
        return 2
    pack(collect(args.run_dir, args.extra), args.out, args.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
