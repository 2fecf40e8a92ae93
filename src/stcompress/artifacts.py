"""The output-directory contract: atomic writes, content hashes, and manifest.json.

A stage writes into a hidden staging directory beside its output and renames it into place only
when everything is written, so an interrupted run never leaves output that looks complete.
`manifest.json` records the stage, the resolved config, input identities (paths + hashes),
package versions, the git revision and timings; downstream stages read it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from stcompress.errors import StcompressError

MANIFEST = "manifest.json"
_FULL_HASH_LIMIT = 64 * 2**20  # larger files get a sampled fingerprint (say so in the record)
_PACKAGES = ("stcompress", "torch", "transformers", "accelerate", "peft", "bitsandbytes", "sacrebleu", "datasets", "numpy")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FAULT_AT, FAULT_LOG = "STCOMPRESS_FAULT_AT", "STCOMPRESS_FAULT_LOG"
_faults_seen = 0


def fault_point(where: str) -> None:
    """Test-only kill switch (tests/test_faults.py): with STCOMPRESS_FAULT_AT=N the process dies at
    the Nth point it reaches (TEXT:N: the Nth point whose name contains TEXT), like a SIGKILL
    (os._exit: no cleanup, no finally); with STCOMPRESS_FAULT_LOG=FILE each point reached is
    appended to FILE. Points sit inside every atomic write (temp file written, not renamed), between
    the renames that replace a directory, and inside the search's appends."""
    global _faults_seen
    if log_path := os.environ.get(FAULT_LOG):
        with open(log_path, "a", encoding="utf-8") as fh:
            fh.write(where + "\n")
    if at := os.environ.get(FAULT_AT):
        text, _, n = at.rpartition(":")
        if text in where:
            _faults_seen += 1
            if _faults_seen == int(n):
                os._exit(137)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs are shared like any file
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        fault_point(f"write {path.name}")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise StcompressError(f"{path}: line {n} is not valid JSON; fix or regenerate the file") from None
    return rows


def file_hash(path: Path) -> dict[str, Any]:
    """sha256 of a file; files over 64 MiB hash their size plus first and last 8 MiB."""
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        if size <= _FULL_HASH_LIMIT:
            for block in iter(lambda: fh.read(2**20), b""):
                digest.update(block)
            return {"sha256": digest.hexdigest(), "bytes": size}
        digest.update(str(size).encode())
        digest.update(fh.read(8 * 2**20))
        fh.seek(size - 8 * 2**20)
        digest.update(fh.read())
    return {"sha256_sampled": digest.hexdigest(), "bytes": size}


def path_identity(path: str | Path) -> dict[str, Any]:
    """Identity of an input: a file's hash, a directory's combined hash, or a name (hub id)."""
    p = Path(path)
    if p.is_file():
        return {"path": str(p.resolve()), **file_hash(p)}
    if p.is_dir():
        digest = hashlib.sha256()
        total = 0
        for f in sorted(x for x in p.rglob("*") if x.is_file() and not x.name.startswith(".")):
            h = file_hash(f)
            total += h["bytes"]
            digest.update(f"{f.relative_to(p)}:{h.get('sha256') or h.get('sha256_sampled')}\n".encode())
        return {"path": str(p.resolve()), "sha256": digest.hexdigest(), "bytes": total}
    return {"name": str(path)}


def content_identity(identity: Any) -> Any:
    """An identity (or a tree of them) without local paths: what a resume compares, so that the
    same content found elsewhere matches and other content at the same path does not."""
    if isinstance(identity, dict):
        return {k: content_identity(v) for k, v in identity.items() if k != "path"}
    if isinstance(identity, list):
        return [content_identity(v) for v in identity]
    return identity


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def git_revision() -> str | None:
    """The git revision of the stcompress checkout, when running from one."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(
        ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True, text=True, timeout=5, check=False,
    ).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")


def build_manifest(
    stage: str, config: dict[str, Any], inputs: dict[str, Any], timings: dict[str, float], **extra: Any
) -> dict[str, Any]:
    return {
        "stage": stage,
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": config,
        "inputs": inputs,
        "versions": package_versions(),
        "git_revision": git_revision(),
        "timings": {k: round(v, 3) for k, v in timings.items()},
        **extra,
    }


def read_manifest(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise StcompressError(f"{directory}: no {MANIFEST} (not a finished stcompress output); run the stage that makes it")
    return json.loads(path.read_text(encoding="utf-8"))


@contextlib.contextmanager
def staged_output(output: str | Path) -> Iterator[Path]:
    """Yield a staging directory; on success it replaces `output` in one rename.

    On error the staging directory is removed and any earlier complete `output` is left as it was.
    """
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.exists() and not output.is_dir():
        raise StcompressError(f"output: {output} exists and is not a directory; choose another output path")
    stage_dir = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    os.chmod(stage_dir, 0o777 & ~_umask())
    try:
        yield stage_dir
    except BaseException:
        shutil.rmtree(stage_dir, ignore_errors=True)
        raise
    if output.exists():
        trash = output.parent / f".{output.name}.old-{os.getpid()}-{int(time.time())}"
        fault_point(f"replace {output.name}")
        os.replace(output, trash)
        fault_point(f"between renames {output.name}")
        os.replace(stage_dir, output)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        fault_point(f"rename {output.name}")
        os.replace(stage_dir, output)
