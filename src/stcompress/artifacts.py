"""The output-directory contract: ownership, preflight, atomic writes, hashes and manifest.json.

A stage writes into a hidden staging directory beside its output and renames it into place only
when everything is written, so an interrupted run never leaves output that looks complete.
`manifest.json` records the stage, the resolved config, input identities (paths + hashes),
package versions, the git revision, timings, and the files the stage wrote; downstream stages
read it.

Who may replace an output, the preflight and the lock: stcompress.outputs.
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
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from stcompress.errors import StcompressError
from stcompress.outputs import (  # noqa: F401  (check_output, foreign_entries: the contract's public face)
    MANIFEST,
    TEMP,
    check_output,
    claim,
    claims_output,
    foreign_entries,
    move_aside,
    overwrite_requested,
    shown,
)

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


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to `.<name>.XXXXXXXX.tmp` beside `path`, fsync, rename: never a half-written `path`.

    On any failure (a full disk included) the temp file is removed; an OSError is re-raised with
    the final file name, which is what the user has to know.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs are shared like any file
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        fault_point(f"write {path.name}")
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.filename is None:
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
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


def sha256_file(path: Path) -> str:
    """sha256 of a whole file, read in 4 MiB blocks (checksums that must see every bit)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(2**22), b""):
            digest.update(block)
    return digest.hexdigest()


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
    with reading(path, "rerun the stage that wrote it"):
        return json.loads(path.read_text(encoding="utf-8"))


@contextlib.contextmanager
def reading(path: str | Path, fix: str) -> Iterator[None]:
    """A file that does not decode (truncated JSON, torn safetensors or torch pickle) is a clear
    error naming it and the fix, not a traceback from deep inside a parser."""
    try:
        yield
    except (ValueError, EOFError, UnicodeDecodeError) as exc:  # json, pickle, safetensors' header
        raise StcompressError(f"{path}: corrupt or truncated ({type(exc).__name__}: {_first_line(exc)}); {fix}") from None
    except Exception as exc:
        name = type(exc).__name__
        if name in ("SafetensorError", "UnpicklingError", "BadZipFile") or "PytorchStreamReader" in str(exc):
            raise StcompressError(f"{path}: corrupt or truncated ({name}: {_first_line(exc)}); {fix}") from None
        raise


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:160]


def write_manifest(directory: str | Path, manifest: dict[str, Any], entries: Iterable[str] | None = None) -> None:
    """manifest.json, listing the files now in `directory` (or in its top-level `entries` only): what
    a later run may replace, and nothing else."""
    directory = Path(directory)
    atomic_write_json(directory / MANIFEST, {**manifest, "files": _files(directory, entries)})


def _files(directory: Path, entries: Iterable[str] | None = None) -> list[str]:
    roots = [directory] if entries is None else [directory / e for e in entries if (directory / e).exists()]
    found = [f for r in roots for f in ([r] if r.is_file() else r.rglob("*"))]
    return sorted({str(f.relative_to(directory)) for f in found
                   if f.is_file() and f != directory / MANIFEST and not TEMP.match(f.name)})


@contextlib.contextmanager
def removed_on_error(paths: Iterable[Path]) -> Iterator[None]:
    """For outputs filled in place: if the block fails (a full disk), the result files it wrote go
    again, so nothing looks complete; the resumable state stays."""
    paths = list(paths)
    try:
        yield
    except BaseException:
        for p in paths:
            with contextlib.suppress(OSError):
                p.unlink(missing_ok=True)
        raise


def _share_permissions(directory: Path) -> None:
    """Readable as the umask allows: some writers (transformers 5's safetensors save) make 0600."""
    readable = 0o444 & ~_umask()
    for f in [directory, *directory.rglob("*")]:
        mode = f.lstat().st_mode
        if not f.is_symlink() and (mode & readable) != readable:
            os.chmod(f, (mode & 0o7777) | readable | (0o111 & ~_umask() if f.is_dir() else 0))


def _record_files(stage_dir: Path) -> None:
    path = stage_dir / MANIFEST
    if path.is_file():
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(manifest, dict):
            write_manifest(stage_dir, manifest)


@contextlib.contextmanager
def staged_output(output: str | Path) -> Iterator[Path]:
    """Yield a staging directory; on success it replaces `output` in one rename.

    On error the staging directory is removed and any earlier complete `output` is left as it was.
    An earlier `output` is replaced only when it is ours (see `foreign_entries`); with --overwrite
    one holding foreign files is moved aside.
    """
    given = output
    output = Path(os.path.abspath(Path(output).expanduser()))
    if output.name in ("", ".", ".."):
        raise StcompressError(f"output: {str(given)!r} is not a directory name; give a new directory for the results")
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.exists() and not output.is_dir():
        raise StcompressError(f"output: {given} exists and is not a directory; choose another output path")
    stage_dir = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    os.chmod(stage_dir, 0o777 & ~_umask())
    try:
        yield stage_dir
        _record_files(stage_dir)
        _share_permissions(stage_dir)
        if output.exists() and foreign_entries(output):
            if not overwrite_requested():
                raise StcompressError(f"output: {given} holds files stcompress did not write "
                                      f"({shown(foreign_entries(output))}); choose another output, or pass --overwrite")
            move_aside(output)
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
