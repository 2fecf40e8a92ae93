"""One writer per output: a lock file beside it, as git does with `index.lock`.

`.<name>.lock` (beside the output, so it survives the output's replacement) is created with
O_EXCL and holds the holder's pid, host, process start time and command. A second command on the
same output is refused with a line naming the holder. A lock whose holder is gone (same host, pid
dead or reused by a later process) is stale: it is taken over with a warning. A lock from another
host cannot be checked and is never taken over; the message says how to remove it.

A multi-process launch (torchrun / accelerate launch: RANK, WORLD_SIZE) is one writer: rank 0 takes
the lock and records the launch (TORCHELASTIC_RUN_ID@MASTER_ADDR:MASTER_PORT); the other ranks
wait until the lock names their launch and never take or release it themselves.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from stcompress.errors import StcompressError

log = logging.getLogger(__name__)

RANK_WAIT = 300.0  # seconds a rank > 0 waits for rank 0's lock (rank 0 may still be checking inputs)
_YOUNG = 30.0  # an unreadable lock younger than this is being written by its holder
_HELD: dict[Path, int] = {}  # locks this process holds -> nesting depth (run -> stage is reentrant)


def lock_path(output: str | Path) -> Path:
    output = Path(os.path.abspath(output))
    return output.parent / f".{output.name}.lock"


def _launch() -> tuple[int, str | None]:
    """(rank, launch id): (0, None) for a plain process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, None
    # Two live launches never share a master port; the run id tells apart launches that reuse one.
    launch = f"{os.environ.get('TORCHELASTIC_RUN_ID', '-')}@{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
    return int(os.environ.get("RANK", "0")), launch


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(holder: dict[str, Any]) -> bool:
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    started = holder.get("pid_start")
    return started is None or _start_time(pid) in (None, started)


def _read(path: Path) -> dict[str, Any] | None:
    """The holder record; None when the file is gone; {} when unreadable (being written, or torn)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return record if isinstance(record, dict) else {}


def describe(holder: dict[str, Any]) -> str:
    command = " ".join(holder.get("command") or []) or "?"
    return f"pid {holder.get('pid')} on {holder.get('host')}, `{command}`, since {holder.get('started')}"


def _create(path: Path, launch: str | None) -> bool:
    record = {"pid": os.getpid(), "pid_start": _start_time(os.getpid()), "host": socket.gethostname(),
              "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "launch": launch,
              "command": [Path(sys.argv[0]).name, *sys.argv[1:]]}
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    return True


def _refuse(output: Path, path: Path, holder: dict[str, Any], item: str) -> StcompressError:
    return StcompressError(
        f"{item}: {output} is being written by another stcompress process ({describe(holder)}); wait for it to "
        f"finish or choose another {item} (if that process is gone, delete {path})"
    )


def _acquire(output: Path, path: Path, launch: str | None, item: str) -> None:
    for _ in range(50):
        if _create(path, launch):
            return
        holder = _read(path)
        if holder is None:
            continue  # released meanwhile
        if holder == {}:
            age = time.time() - path.stat().st_mtime if path.exists() else 0.0
            if age < _YOUNG:
                time.sleep(0.1)
                continue
            log.warning("%s: unreadable lock file %s from %.0f s ago; taking it over", item, path, age)
        elif holder.get("host") != socket.gethostname() or _alive(holder):
            raise _refuse(output, path, holder, item)
        else:
            log.warning("%s: taking over the stale lock %s (%s is gone)", item, path, describe(holder))
        if _read(path) == holder:  # nobody took it over meanwhile
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    raise StcompressError(f"{item}: could not take the lock {path}; delete it if no stcompress process writes {output}")


def _wait_for_rank0(output: Path, path: Path, launch: str, item: str) -> None:
    deadline = time.monotonic() + RANK_WAIT
    while time.monotonic() < deadline:
        holder = _read(path)
        if holder and holder.get("launch") == launch and holder.get("ready") and _alive(holder):
            return  # (a dead holder with our launch id: a killed launch that used the same port)
        if holder and holder.get("launch") != launch and holder.get("host") == socket.gethostname() and _alive(holder):
            raise _refuse(output, path, holder, item)
        time.sleep(0.1)
    raise StcompressError(f"{item}: rank 0 of this launch did not lock {output} within {RANK_WAIT:.0f} s; see rank 0's error")


def _mark_ready(path: Path) -> None:
    """Rank 0 finished its start-up clean-up: the other ranks of the launch may write."""
    record = _read(path) or {}
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({**record, "ready": True}) + "\n", encoding="utf-8")
    os.replace(tmp, path)


@contextlib.contextmanager
def output_lock(output: str | Path, *, item: str = "output", on_acquire: Any = None) -> Iterator[None]:
    """Hold the lock of `output` for the block; `on_acquire()` runs once it is held, before the
    other ranks of a launch are let in (start-up clean-up)."""
    output = Path(os.path.abspath(output))
    path = lock_path(output)
    rank, launch = _launch()
    if path in _HELD:
        _HELD[path] += 1
        try:
            yield
        finally:
            _HELD[path] -= 1
        return
    if rank > 0:
        _wait_for_rank0(output, path, launch or "", item)
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    _acquire(output, path, launch, item)
    _HELD[path] = 1
    try:
        if on_acquire is not None:
            on_acquire()
        if launch is not None:
            _mark_ready(path)
        yield
    finally:
        del _HELD[path]
        holder = _read(path)
        if holder and holder.get("pid") == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
