"""The search's on-disk state: one append-only JSONL per process, read back on resume.

Each evaluated candidate is one line, appended and fsynced after its hypotheses file is written,
so a kill at any moment loses at most the candidate in flight. Several processes (one per GPU)
share an output directory: each appends to its own file, and everyone reads the union.

A resume trusts nothing it cannot check: every line carries the sha256 of its own content and of
its hypotheses file. A line without its newline is what a kill mid-append leaves (dropped, the
candidate is redone); a complete line that fails its checksum, or a hypotheses file changed or
missing since it was scored, is refused with the file's name: a silently different search is worse
than none.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stcompress.artifacts import fault_point
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
    hypotheses: str = ""  # file name in hypotheses/
    hypotheses_sha256: str = ""

    @property
    def key(self) -> tuple[int, int | None, tuple[int, ...], int]:
        return (self.round, self.layer, self.removed, self.segments)

    def to_json(self) -> str:
        row = asdict(self)
        row["removed"] = list(self.removed)
        return json.dumps(row, ensure_ascii=False)

    def to_line(self) -> str:
        """The state-file line: the record plus the sha256 of its canonical JSON."""
        row = json.loads(self.to_json())
        return json.dumps({**row, "sha256": _row_hash(row)}, ensure_ascii=False)

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> Record:
        return cls(**{**row, "removed": tuple(row["removed"])})


def _row_hash(row: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(row, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def bytes_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hypotheses_name(round_: int, layer: int | None, segments: int, total: int) -> str:
    name = "baseline" if layer is None else f"round{round_:02d}-layer{layer:02d}"
    return f"{name}.jsonl" if segments == total else f"{name}-n{segments}.jsonl"


class SearchState:
    """Records of every process sharing `directory`; appends go to this process's own file."""

    def __init__(self, directory: Path, rank: int = 0):
        self.directory = Path(directory)
        self.own = self.directory / f"candidates.rank{rank}.jsonl"
        self.records: dict[tuple, Record] = {}
        self._checked: set[tuple[Path, int]] = set()  # (file, line) already verified
        self.refresh()

    def files(self) -> list[Path]:
        return sorted(self.directory.glob("candidates.rank*.jsonl"))

    def refresh(self) -> None:
        for path in self.files():
            data = path.read_bytes()
            lines = data.split(b"\n")
            complete = lines[:-1]  # the last piece has no newline: empty, or torn by a kill
            for n, raw in enumerate(complete, 1):
                if raw.strip() and (path, n) not in self._checked:
                    rec = self._parse(path, n, raw)
                    self._checked.add((path, n))
                    self.records[rec.key] = rec

    def _parse(self, path: Path, n: int, raw: bytes) -> Record:
        where = f"{path}: line {n}"
        fix = "it was changed after it was written; delete that line to redo the candidate, or set restart: true (--restart) to start the search over"
        try:
            row = json.loads(raw)
            claimed = row.pop("sha256")
            rec = Record.from_dict(row)
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError, AttributeError):
            raise StcompressError(f"{where} is corrupt or has no checksum; {fix}") from None
        if claimed != _row_hash(row):
            raise StcompressError(f"{where} does not match its checksum; {fix}")
        hyp = self.directory / "hypotheses" / rec.hypotheses
        if not rec.hypotheses or not hyp.is_file() or bytes_hash(hyp.read_bytes()) != rec.hypotheses_sha256:
            raise StcompressError(f"{hyp}: missing or changed since it was scored ({where}); delete that line to redo "
                                  "the candidate, or set restart: true (--restart) to start the search over")
        return rec

    def get(self, round_: int, layer: int | None, removed: Iterable[int], segments: int) -> Record | None:
        return self.records.get((round_, layer, tuple(removed), segments))

    def append(self, record: Record) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._drop_torn_tail()
        line = (record.to_line() + "\n").encode("utf-8")
        with open(self.own, "ab") as fh:
            fh.write(line[: len(line) // 2])
            fh.flush()
            fault_point(f"append {self.own.name}")  # tests: a kill that tears the line
            fh.write(line[len(line) // 2 :])
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
