"""Who owns an output directory, and the preflight every stage runs before loading anything.

`claim` (the `claims_output` decorator on every stage's `run`) checks the output and holds its
lock (stcompress.lock) while the stage runs. An existing output may be replaced when everything in
it is ours: the files a finished output's manifest lists (manifests list them since this version;
an older manifest of a known stage vouches for its whole directory), what a stage that fills its
output in place writes there, and our temp names. Anything else is refused with one line: a
directory holding the user's files, the data folder (any input's folder), `.`, the working
directory or a parent of it, the home directory, a file.

`--overwrite` never deletes what we did not write: a directory holding foreign files is moved
aside to `<name>.replaced-<time>` beside it, and the new output takes its place. The paths that can
never be an output (the working directory and its parents, home, an input's folder, a file) stay
refused with it.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import fnmatch
import functools
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from stcompress.errors import StcompressError
from stcompress.failures import describe_os_error
from stcompress.lock import output_lock

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"

STAGES = ("translate", "evaluate", "importance", "prune", "distill", "finetune", "export", "report", "run", "sweep", "demo")
# Our own temp and leftover names, `.<name>.<suffix>`: atomic writes, staging, the lock.
TEMP = re.compile(r"^\.(?P<name>.+?)\.(?:[A-Za-z0-9_]+\.tmp|tmp\.png|partial-[A-Za-z0-9_]+|partial|old-[0-9-]+|lock)$")
# Config keys naming inputs (when they exist on disk): an output must never hold one.
_INPUT_KEYS = ("path", "dataset", "hypotheses", "importance", "input", "base_model", "scores", "distilled",
               "teacher", "run_dir", "recipe", "model")
_OVERWRITE: contextvars.ContextVar[bool] = contextvars.ContextVar("stcompress_overwrite", default=False)


def overwrite_requested() -> bool:
    return _OVERWRITE.get()


@contextlib.contextmanager
def overwrite(allowed: bool = True) -> Iterator[None]:
    """`--overwrite` for the block: foreign directories are moved aside instead of refused."""
    token = _OVERWRITE.set(allowed)
    try:
        yield
    finally:
        _OVERWRITE.reset(token)


def _listed(directory: Path) -> set[str] | None:
    """Files a finished output's manifest says we wrote; None when there is no such manifest."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("stage") not in STAGES:
        return None
    files = manifest.get("files")
    if not isinstance(files, list):  # written before manifests listed files: the whole directory
        return {str(f.relative_to(directory)) for f in directory.rglob("*") if f.is_file()}
    return {MANIFEST, *map(str, files)}


def foreign_entries(directory: str | Path, own: Sequence[str] = ()) -> list[str]:
    """Top-level entries of `directory` that stcompress did not write (names, sorted).

    Ours: the files a finished output's manifest lists, entries matching the glob patterns `own`
    (what a stage that fills its output in place writes there), and our temp names for any of them.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    listed = _listed(directory) or set()

    def ours(entry: Path) -> bool:
        temp = TEMP.match(entry.name)
        name = temp.group("name") if temp else entry.name
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in own):
            return True
        if entry.is_dir() and not entry.is_symlink():
            files = [f for f in entry.rglob("*") if f.is_file() and not TEMP.match(f.name)]
            return all(str(f.relative_to(directory)) in listed for f in files)  # empty: nothing to lose
        return str(entry.relative_to(directory)) in listed or (temp is not None and listed != set())

    return sorted(e.name for e in directory.iterdir() if not ours(e))


def shown(names: Sequence[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def config_inputs(cfg: Any) -> list[tuple[str, Path]]:
    """(item, path) of every input a stage config names that exists on disk."""
    from stcompress.config import to_dict

    found: list[tuple[str, Path]] = []

    def walk(tree: Any, prefix: str) -> None:
        if isinstance(tree, dict):
            for key, value in tree.items():
                walk(value, f"{prefix}{key}" if not isinstance(value, (dict, list)) else f"{prefix}{key}.")
        elif isinstance(tree, list):
            for i, value in enumerate(tree):
                walk(value, f"{prefix.rstrip('.')}[{i}].")
        elif isinstance(tree, str) and tree and prefix.rsplit(".", 1)[-1] in _INPUT_KEYS:
            path = Path(tree).expanduser()
            if path.exists():
                found.append((prefix, path))

    walk(to_dict(cfg), "")
    return found


def _never_output(output: Path, inputs: Iterable[tuple[str, Path]], given: str, item: str) -> str | None:
    """Why `output` can never be an output, even with --overwrite (None: it can)."""
    cwd = Path.cwd().resolve()
    if output == cwd or output in cwd.parents:
        where = "the current directory" if output == cwd else "a parent of the current directory"
        return f"{item}: {given} is {where}; give a new directory for the results, e.g. --{item.replace('_', '-')} ./results"
    if output == Path.home().resolve():
        return f"{item}: {given} is your home directory; give a new directory for the results"
    for key, path in inputs:
        resolved = path.resolve()
        if resolved == output or output in resolved.parents:
            return f"{item}: {given} holds the input {key} ({path}); choose another {item}, outside it"
    if output.exists() and not output.is_dir():
        return f"{item}: {given} exists and is a file, not a directory; choose another {item}"
    return None


def _probe(directory: Path, item: str, given: str) -> None:
    """Create and remove a file in the nearest existing ancestor: permissions, read-only disks, ACLs."""
    anchor = directory
    while not anchor.exists():
        anchor = anchor.parent
    if not anchor.is_dir():
        raise StcompressError(f"{item}: {given} cannot be created: {anchor} is a file; choose another {item}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".stcompress-probe-", dir=anchor)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT):
            raise StcompressError(describe_os_error(exc.errno, f"{item}: cannot write in {anchor}", f"another {item}")) from None
        raise
    os.close(fd)
    os.unlink(probe)


def check_output(path: str | Path, *, inputs: Iterable[tuple[str, Path]] = (), in_place: Sequence[str] | None = None,
                 shared: bool = False, item: str = "output") -> Path:
    """The preflight: refuse an output we may not write, before any model or data is loaded.

    `in_place`: glob patterns of what a stage that fills its output directly (no staging) writes
    there; `shared`: a directory that may also hold the user's files (a run directory).
    """
    given = str(path)
    output = Path(os.path.abspath(Path(path).expanduser()))
    if not given.strip() or output.name in ("", ".", ".."):
        raise StcompressError(f"{item}: {given!r} is not a directory name; give a new directory for the results")
    output = output.parent.resolve() / output.name
    reason = _never_output(output, [] if shared else list(inputs), given, item)  # a run dir may hold its recipe
    if reason:
        raise StcompressError(reason)
    foreign = [] if shared else foreign_entries(output, in_place or ())
    if foreign and not _OVERWRITE.get():
        raise StcompressError(
            f"{item}: {given} holds files stcompress did not write ({shown(foreign)}); choose another {item}, or pass "
            f"--overwrite to move that directory aside (to {output.name}.replaced-<time>; nothing is deleted)"
        )
    _probe(output if in_place is not None and output.is_dir() else output.parent, item, given)
    return output


def move_aside(output: Path) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    target = output.with_name(f"{output.name}.replaced-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = output.with_name(f"{output.name}.replaced-{stamp}-{n}")
    os.replace(output, target)
    log.warning("--overwrite: moved %s (it held files stcompress did not write) aside to %s", output, target)
    return target


def remove_output(output: str | Path, own: Sequence[str] = (), *, item: str = "output") -> None:
    """Delete an output of ours (to rebuild it); refuse when it holds anything we did not write."""
    output = Path(output)
    if not output.exists():
        return
    foreign = foreign_entries(output, own) if output.is_dir() else [output.name]
    if foreign:
        if not _OVERWRITE.get() or not output.is_dir():
            raise StcompressError(f"{item}: {output} holds files stcompress did not write ({shown(foreign)}); "
                                  f"move them out, or pass --overwrite to move the directory aside")
        move_aside(output)
        return
    shutil.rmtree(output)


def _sweep(output: Path, in_place: Sequence[str] | None, shared: bool) -> None:
    """Under the lock: leftovers of attempts that were killed (no other process writes here)."""
    for pattern in (f".{output.name}.partial-*", f".{output.name}.old-*"):
        for stale in output.parent.glob(glob_escape(pattern)):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    if in_place is None or not output.is_dir():
        return
    for entry in output.iterdir():
        temp = TEMP.match(entry.name)
        if temp and not entry.name.endswith(".lock") and any(fnmatch.fnmatchcase(temp.group("name"), p) for p in in_place):
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
        elif not shared and entry.is_dir() and any(fnmatch.fnmatchcase(entry.name, p) for p in in_place):
            for f in entry.rglob(".*"):
                if f.is_file() and TEMP.match(f.name):
                    f.unlink(missing_ok=True)


def glob_escape(pattern: str) -> str:
    """Escape glob characters in the output's own name, keep our trailing `*`."""
    head, star = (pattern[:-1], "*") if pattern.endswith("*") else (pattern, "")
    return re.sub(r"([\[\]?*])", r"[\1]", head) + star


@contextlib.contextmanager
def claim(path: str | Path, *, inputs: Iterable[tuple[str, Path]] = (), in_place: Sequence[str] | None = None,
          shared: bool = False, item: str = "output") -> Iterator[Path]:
    """Preflight, then hold the output's lock for the block; failures carry the output's path
    (`exc.stcompress_output`) so the CLI can say where a disk filled up."""
    output = check_output(path, inputs=inputs, in_place=in_place, shared=shared, item=item)

    def start() -> None:
        if in_place is not None and not shared and foreign_entries(output, in_place):
            move_aside(output)  # only reachable with --overwrite (check_output refused otherwise)
        _sweep(output, in_place, shared)

    try:
        with output_lock(output, item=item, on_acquire=start):
            yield output
    except BaseException as exc:
        if not hasattr(exc, "stcompress_output"):
            with contextlib.suppress(AttributeError, TypeError):
                exc.stcompress_output = str(path)  # type: ignore[attr-defined]
        raise


def claims_output(where: Callable[[Any], str | Path] | None = None, *, in_place: Sequence[str] | None = None,
                  shared: bool = False, item: str = "output") -> Callable:
    """Decorate a stage's `run(cfg, ...)`: `claim` its output (`where(cfg)`, default cfg.output)."""

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(cfg: Any, *args: Any, **kwargs: Any) -> Any:
            if getattr(cfg, "dry_run", False):
                return fn(cfg, *args, **kwargs)
            path = where(cfg) if where is not None else cfg.output
            with claim(path, inputs=config_inputs(cfg), in_place=in_place, shared=shared, item=item):
                return fn(cfg, *args, **kwargs)

        return run

    return wrap


