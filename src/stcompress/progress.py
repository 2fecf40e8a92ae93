"""Progress: tqdm bars normally; under `-q`, one status line (stage, step/total, ETA) instead.

Quiet mode hides the bars and the INFO log, which left minutes of teacher fine-tuning without a
sign of life. The status line costs one line: on a terminal it rewrites itself in place (stderr);
in a log file it prints at most every `interval` seconds, plus once when each bar finishes.
`stcompress run` names the current stage ([3/11] importance) so every line says where it is.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TextIO

from tqdm.auto import tqdm


@dataclass
class Status:
    enabled: bool = False  # the CLI turns it on with -q
    stage: str = ""  # "[3/11] importance (importance)" while `stcompress run` runs that stage
    interval: float = 30.0  # seconds between lines when stderr is not a terminal
    stream: TextIO | None = None  # None: sys.stderr at the time of writing
    last_print: float = float("-inf")
    width: int = 0  # length of the line on a terminal (to blank out a longer one)

    def out(self) -> TextIO:
        return self.stream or sys.stderr

    def write(self, text: str, *, final: bool = False) -> None:
        stream = self.out()
        line = f"{self.stage}: {text}" if self.stage else text
        if stream.isatty():
            stream.write("\r" + line.ljust(self.width))
            self.width = len(line)
            stream.flush()
            return
        now = time.monotonic()
        if final or now - self.last_print >= self.interval:
            stream.write(line + "\n")
            stream.flush()
            self.last_print = now

    def end_line(self) -> None:
        if self.width and self.out().isatty():
            self.out().write("\n")
            self.width = 0


STATUS = Status()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"


class StatusBar:
    """The part of tqdm's interface stcompress uses, drawn as the status line."""

    def __init__(self, total: int, desc: str, unit: str, initial: int = 0, leave: bool = True):
        self.total, self.desc, self.unit, self.n, self.start_n = total, desc, unit, initial, initial
        self.leave = leave  # False: a short inner bar (one candidate's translation); no line of its own at the end
        self.t0 = time.monotonic()
        self.postfix = ""
        self._show(final=False)

    def _show(self, final: bool) -> None:
        done = self.n - self.start_n
        elapsed = time.monotonic() - self.t0
        if final:
            tail = f"done in {_duration(elapsed)}"
        elif done > 0 and self.total:
            tail = f"ETA {_duration(elapsed / done * max(self.total - self.n, 0))}"
        else:
            tail = "ETA -"
        extra = f", {self.postfix}" if self.postfix else ""
        STATUS.write(f"{self.desc} {self.n}/{self.total} {self.unit}{extra}, {tail}", final=final)

    def update(self, n: int = 1) -> None:
        self.n += n
        self._show(final=False)

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def close(self) -> None:
        self._show(final=self.leave)


def bar(total: int, desc: str, unit: str, *, progress: bool, initial: int = 0, leave: bool = True) -> Any:
    """A tqdm bar when `progress`; else the status line when it is on (-q); else nothing shown."""
    if not progress and STATUS.enabled and os.environ.get("RANK", "0") == "0":  # one line per launch, not per GPU
        return StatusBar(total, desc, unit, initial, leave)
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not progress, leave=leave)


@contextlib.contextmanager
def stage(label: str) -> Iterator[None]:
    """Name the running stage in every status line; one line when it starts and when it ends."""
    previous, STATUS.stage = STATUS.stage, label
    t0 = time.monotonic()
    if STATUS.enabled:
        STATUS.write("starting", final=True)
    try:
        yield
        if STATUS.enabled:
            STATUS.write(f"finished in {_duration(time.monotonic() - t0)}", final=True)
    finally:
        if STATUS.enabled:
            STATUS.end_line()
        STATUS.stage = previous
