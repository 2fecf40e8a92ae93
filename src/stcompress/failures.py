"""Failures users can act on, told in one line; termination signals handled like Ctrl-C.

A full disk, a missing permission or a read-only file system is not a bug: the CLI names the file
and the fix. Libraries that write in C++ or Rust (torch.save, safetensors) report these as text
inside their own exception types, so the message text is read too. Anything else keeps its
traceback and is reported as a bug.

SIGTERM (a scheduler's kill, `kill PID`, torchrun stopping its workers) and SIGHUP (a closed
terminal) raise `Terminated`, a KeyboardInterrupt: every `except BaseException` clean-up (staging
directories, temp files, locks, run's plan.json) runs exactly as for Ctrl-C.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import tempfile
import threading
from collections.abc import Iterator

from stcompress.errors import Terminated

# errno -> (what happened, how to fix it)
_KNOWN = {
    errno.ENOSPC: ("no space left on device", "free space (or choose a path on a larger disk) and rerun"),
    errno.EDQUOT: ("disk quota exceeded", "free space within your quota (or choose another disk) and rerun"),
    errno.EACCES: ("permission denied", "make it accessible to you (chmod / chown) or choose another path"),
    errno.EPERM: ("operation not permitted", "make it writable by you (check chattr / ACLs) or choose another path"),
    errno.EROFS: ("read-only file system", "choose a path on a writable disk"),
    errno.EIO: ("input/output error", "check the disk (dmesg), then rerun"),
}
# How C++ / Rust writers (torch's PytorchStreamWriter, safetensors) spell them inside other exceptions.
_TEXT = (
    (re.compile(r"No space left on device|os error 28\b|StorageFull", re.I), errno.ENOSPC),
    (re.compile(r"Disk quota exceeded|os error 122\b", re.I), errno.EDQUOT),
    (re.compile(r"Read-only file system|os error 30\b|ReadOnlyFilesystem", re.I), errno.EROFS),
    (re.compile(r"Permission denied|os error 13\b", re.I), errno.EACCES),
)
_STAGING = re.compile(r"/\.([^/]+)\.partial-[A-Za-z0-9_]+(?=/|$)")
# torch.save's C++ writer on a full disk says only "unexpected pos 576 vs 534" / "iostream error".
_TORCH_WRITER = re.compile(r"inline_container\.cc|PytorchStreamWriter|iostream error")
SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]


def os_error_code(exc: BaseException) -> tuple[int, str | None] | None:
    """(errno, file) of the environment failure behind `exc`, or None when it is not one."""
    for link in _chain(exc):
        if isinstance(link, OSError) and link.errno in _KNOWN:
            return link.errno, link.filename if isinstance(link.filename, str) else None
    for link in _chain(exc):
        for pattern, code in _TEXT:
            if pattern.search(str(link)):
                return code, None
    if any(_TORCH_WRITER.search(str(link)) for link in _chain(exc)):
        code = _cannot_write(getattr(exc, "stcompress_output", None))
        if code is not None:
            return code, None
    return None


def _cannot_write(output: str | None) -> int | None:
    """After a writer failed without saying why: does writing 1 MiB beside the output fail now?"""
    directory = os.path.dirname(os.path.abspath(output)) if output else os.getcwd()
    try:
        fd, probe = tempfile.mkstemp(prefix=".stcompress-probe-", dir=directory)
    except OSError as exc:
        return exc.errno if exc.errno in _KNOWN else None
    try:
        os.write(fd, b"\0" * 2**20)
        os.fsync(fd)
    except OSError as exc:
        return exc.errno if exc.errno in _KNOWN else None
    finally:
        os.close(fd)
        os.unlink(probe)
    return None


def describe_os_error(code: int, where: str, instead: str | None = None) -> str:
    """"<where>: <what happened>; <fix>", the fix's last resort being `instead` (default: another path)."""
    what, fix = _KNOWN[code]
    if instead:
        fix = fix.replace("another path", instead).replace("a path on", instead.replace("another ", "an ") + " on")
    return f"{where}: {what}; {fix}"


def explain(exc: BaseException) -> str | None:
    """One line for an environment failure (disk full, permission, read-only disk), else None.

    Names the file when the error carries one, and the output being written (the claim records
    it on the exception) so the user knows where space or permission is missing.
    """
    found = os_error_code(exc)
    if found is None:
        return None
    code, filename = found
    output = getattr(exc, "stcompress_output", None)
    if filename:  # a file in a staging directory is reported under the name it was going to have
        filename = _STAGING.sub(r"/\1", filename)
    where = filename or output or "a file"
    line = describe_os_error(code, where)
    if output and filename and not filename.startswith(str(output)):
        line += f" (while making {output})"
    if output:
        line += "; nothing was marked complete"
    return line


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated(signum)


@contextlib.contextmanager
def terminate_like_interrupt() -> Iterator[None]:
    """SIGTERM / SIGHUP raise Terminated in the main thread for the block (then handlers are restored)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _raise_terminated) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def exit_code(exc: KeyboardInterrupt) -> int:
    return SIGNAL_EXIT.get(exc.signum, 130) if isinstance(exc, Terminated) else 130
