"""Model commands of `python -m stcompress.testbed`: build-pack, build-model, rebuild, seed, split-pack, join-pack."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from stcompress.artifacts import sha256_file

CHUNK_MIB = 50


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build-pack", help="registry parts -> testbed pack (CPU, ~5 min)")
    p.add_argument("--out", type=Path, required=True, help="the pack file to write, e.g. runs/testbed/testbed-base.gguf")
    p.add_argument("--parts", type=Path, default=None, help="folder of downloaded registry wheels (else installed packages)")
    p.add_argument("--cache", type=Path, default=None, help="where assembled parts go (default: beside --out)")
    m = sub.add_parser("build-model", help="pack -> saved Qwen2-Audio base model + processor (any machine, ~1 min)")
    m.add_argument("--pack", type=Path, required=True)
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--seed", type=int, default=0, help="projector initialisation seed")
    s = sub.add_parser("split-pack", help=f"cut a file into <= {CHUNK_MIB} MiB chunks + a sha256 list (for transfers)")
    s.add_argument("file", type=Path)
    s.add_argument("--mib", type=int, default=CHUNK_MIB)
    t = sub.add_parser("tar-data", help="one language's manifests + the clips they name, as one tar (for transfers)")
    t.add_argument("data", type=Path, help="e.g. runs/testbed-data/de")
    t.add_argument("--out", type=Path, required=True)
    r = sub.add_parser("rebuild", help="any testbed system from the base model + committed artifacts (CPU, no GPU)")
    r.add_argument("--base", type=Path, required=True, help="the base model build-model wrote, e.g. runs/testbed/base")
    r.add_argument("--artifacts", type=Path, required=True, help="unpacked collect_artifacts output, e.g. benchmarks/testbed/results/de-run2")
    r.add_argument("--system", required=True, help="teacher, prune25, prune50, final25, final50, or any model stage's name")
    r.add_argument("--out", type=Path, required=True, help="the model directory to write (must not exist)")
    r.add_argument("--check-data", default="builtin:demo-dev", help="clips for the stages' reload checks (default: the package's own)")
    r.add_argument("--device", default="cpu")
    e = sub.add_parser("seed", help="finished stages of an earlier run (its artifacts) into a run directory, model weights rebuilt")
    e.add_argument("--base", type=Path, required=True, help="the base model build-model wrote, e.g. runs/testbed/base")
    e.add_argument("--artifacts", type=Path, required=True, help="unpacked collect_artifacts output, e.g. benchmarks/testbed/results/de-run3")
    e.add_argument("--run-dir", type=Path, required=True, help="the recipe's run_dir, e.g. runs/testbed-de")
    e.add_argument("--stages", required=True, help="comma-separated finished stages, e.g. asr,asr-merged,teacher,teacher-merged, or all")
    e.add_argument("--check-data", default="builtin:demo-dev", help="clips for the rebuilt stages' reload checks")
    e.add_argument("--device", default="cpu")
    j = sub.add_parser("join-pack", help="rejoin chunks written by split-pack (sha256 checked)")
    j.add_argument("file", type=Path, help="the file to recreate; its chunks FILE.partNN and FILE.sha256 beside it")


def run_command(args: argparse.Namespace) -> int:
    if args.cmd == "build-pack":
        from stcompress.testbed.model import build_pack

        build_pack(args.out, args.parts, args.cache or args.out.parent / ".parts-cache")
        print(f"{args.out}  {args.out.stat().st_size} bytes  sha256 {sha256_file(args.out)}")
    elif args.cmd == "build-model":
        from stcompress.testbed.model import materialise

        print(materialise(args.pack, args.out, args.seed))
    elif args.cmd == "rebuild":
        from stcompress.testbed.rebuild import rebuild

        print(rebuild(args.base, args.artifacts, args.system, args.out, check_data=args.check_data, device=args.device))
    elif args.cmd == "seed":
        from stcompress.testbed.rebuild import seed

        stages = [s.strip() for s in args.stages.split(",") if s.strip()]
        done = seed(args.base, args.artifacts, args.run_dir, stages, check_data=args.check_data, device=args.device)
        print(f"seeded {args.run_dir}: {', '.join(done) or 'nothing new'}")
    elif args.cmd == "split-pack":
        split(args.file, args.mib)
    elif args.cmd == "tar-data":
        tar_data(args.data, args.out)
    elif args.cmd == "join-pack":
        join(args.file)
    return 0




def split(path: Path, mib: int = CHUNK_MIB) -> list[Path]:
    size, out = mib << 20, []
    with path.open("rb") as f:
        while block := f.read(size):
            chunk = path.with_name(f"{path.name}.part{len(out):02d}")
            chunk.write_bytes(block)
            out.append(chunk)
    path.with_name(path.name + ".sha256").write_text(json.dumps({"sha256": sha256_file(path), "parts": len(out)}))
    for chunk in out:
        print(chunk, chunk.stat().st_size)
    return out


def join(path: Path) -> Path:
    from stcompress.errors import ModelError

    meta = json.loads(path.with_name(path.name + ".sha256").read_text())
    chunks = [path.with_name(f"{path.name}.part{i:02d}") for i in range(meta["parts"])]
    missing = [str(c) for c in chunks if not c.is_file()]
    if missing:
        raise ModelError(f"join-pack: missing chunks {missing}; carry every chunk first")
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        for c in chunks:
            f.write(c.read_bytes())
    if sha256_file(tmp) != meta["sha256"]:
        tmp.unlink()
        raise ModelError(f"join-pack: {path} rejoined has the wrong sha256; carry the chunks again")
    os.replace(tmp, path)
    print(path)
    return path


def tar_data(data: Path, out: Path) -> Path:
    """`<lang>/` with its manifests, README, checks and only the clips the manifests name (sorted, so
    the same data gives the same tar)."""
    import tarfile

    files = [data / n for n in ("README.md", "checks.json", "sentences.jsonl", "train.jsonl", "dev.jsonl", "test.jsonl")]
    clips = set()
    for split in ("train", "dev", "test"):
        for line in (data / f"{split}.jsonl").read_text(encoding="utf-8").splitlines():
            clips.add(data / json.loads(line)["audio"])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with tarfile.open(tmp, "w") as tar:
        for f in [*files, *sorted(clips)]:
            info = tar.gettarinfo(str(f), arcname=str(f.relative_to(data.parent)))
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            with f.open("rb") as h:
                tar.addfile(info, h)
    os.replace(tmp, out)
    print(out, out.stat().st_size, f"({len(clips)} clips)")
    return out
