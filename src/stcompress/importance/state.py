"""The search's on-disk state: one append-only JSONL per process, read back on resume.

Each evaluated candidate is one line, appended and fsynced after its hypotheses file is written,
so a kill at any moment loses at most the candidate in flight. Several processes (one per GPU)
share an output directory: each appends to its own file, and everyone reads the union.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stcompress.errors import StcompressError


@dataclass(frozen=True)
class Record:
    """One evaluated variant: `layer` removed on top of `removed` (None: the unpruned baseline)."""

    round: int
    layer: int | None
    removed: tuple[int, ...]
    segments: int
    scores: dict[str, float]
    seconds: float
    approximate: bool = False  # scored on fewer segments than the dev set (successive halving)
    signatures: dict[str, str] = field(default_factory=dict)

    @property
    def key(self) -> tuple[int, int | None, tuple[int, ...], int]:
        return (self.round, self.layer, self.removed, self.segments)

    def to_json(self) -> str:
        row = asdict(self)
        row["removed"] = list(self.removed)
        return json.dumps(row, ensure_ascii=False)

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> Record:
        return cls(**{**row, "removed": tuple(row["removed"])})


def hypotheses_name(round_: int, layer: int | None, segments: int, total: int) -> str:
    name = "baseline" if layer is None else f"round{round_:02d}-layer{layer:02d}"
    return f"{name}.jsonl" if segments == total else f"{name}-n{segments}.jsonl"


class SearchState:
    """Records of every process sharing `directory`; appends go to this process's own file."""

    def __init__(self, directory: Path, rank: int = 0):
        self.directory = Path(directory)
        self.own = self.directory / f"candidates.rank{rank}.jsonl"
        self.records: dict[tuple, Record] = {}
        self.refresh()

    def files(self) -> list[Path]:
        return sorted(self.directory.glob("candidates.rank*.jsonl"))

    def refresh(self) -> None:
        for path in self.files():
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rec = Record.from_dict(json.loads(line))
                except (json.JSONDecodeError, TypeError, KeyError):
                    if n == len(path.read_text(encoding="utf-8").splitlines()):
                        continue  # a line cut off by a kill: that candidate is simply redone
                    raise StcompressError(f"{path}: line {n} is corrupt; delete that line to redo the candidate") from None
                self.records[rec.key] = rec

    def get(self, round_: int, layer: int | None, removed: Iterable[int], segments: int) -> Record | None:
        return self.records.get((round_, layer, tuple(removed), segments))

    def append(self, record: Record) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._drop_torn_tail()
        with open(self.own, "a", encoding="utf-8") as fh:
            fh.write(record.to_json() + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.records[record.key] = record

    def _drop_torn_tail(self) -> None:
        """A kill mid-write leaves a last line without its newline: cut it before appending."""
        if not self.own.is_file() or self.own.stat().st_size == 0:
            return
        data = self.own.read_bytes()
        if not data.endswith(b"\n"):
            self.own.write_bytes(data[: data.rfind(b"\n") + 1])

    def all_records(self) -> list[Record]:
        return sorted(self.records.values(), key=lambda r: (r.round, -1 if r.layer is None else r.layer, r.segments))
