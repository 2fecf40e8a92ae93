"""Errors a user can fix.

The CLI prints a `StcompressError` as one line (no traceback). Every message names the item that
is wrong and says how to fix it: "<item>: <what is wrong>; <fix>".
"""

from __future__ import annotations


class StcompressError(Exception):
    """A problem with the user's input, config or environment."""


class ConfigError(StcompressError):
    """One or more config problems, reported together."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        if len(self.problems) == 1:
            super().__init__(self.problems[0])
        else:
            lines = "\n".join(f"  - {p}" for p in self.problems)
            super().__init__(f"{len(self.problems)} config problems:\n{lines}")


class DataError(StcompressError):
    """Bad or missing data (audio, manifest, dataset columns, references)."""


class ModelError(StcompressError):
    """A model directory or model option that cannot be used."""


class Terminated(KeyboardInterrupt):
    """SIGTERM / SIGHUP, raised where Ctrl-C would be, so the same clean-up runs (failures.py)."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"terminated by signal {signum}")
