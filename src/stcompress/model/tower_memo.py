"""Audio-tower output remembered across the stages of one process.

Decoder-only compression never changes the audio tower, and a frozen tower stays the same through
fine-tuning, so in one `stcompress run` the same tower often encodes the same clips again and
again: the teacher's evaluation, the importance search, pruning checks, KD translation, training
caches. `tower_outputs` looks clips up by (tower fingerprint, clip samples) first and runs the tower
only on the rest. The fingerprint is the SHA-256 of every tower tensor's bytes plus the feature
extractor's settings, so any change to the tower (training, a LoRA merge, another dtype) is a miss,
never a stale hit. 4-bit towers are not remembered (their packed weights and quantization state are
not plain tensors). Memory is bounded (STCOMPRESS_TOWER_MEMO_MB, default 2048; 0 turns it off);
the least recently used clips go first.

Across processes (one GPU stretch runs a recipe in several calls, each a new process):
STCOMPRESS_TOWER_MEMO_DIR=DIR also keeps every remembered output as DIR/<fingerprint>/<clip>.pt
(`artifacts.atomic_write_bytes`: never a half-written file) and reads it back on a miss in memory, so a later
process does not encode the same clips with the same tower again. Off when unset.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from stcompress.artifacts import atomic_write_bytes
from stcompress.data.audio import SAMPLE_RATE
from stcompress.model import arch

MEMO_ENV = "STCOMPRESS_TOWER_MEMO_MB"
MEMO_DIR_ENV = "STCOMPRESS_TOWER_MEMO_DIR"


def clip_key(audio: np.ndarray) -> str:
    """Identity of a clip's samples: items sharing audio (references, KD targets, repeats) share it."""
    return hashlib.sha1(np.ascontiguousarray(audio).view(np.uint8)).hexdigest()


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.view(torch.int16)
    return t.numpy().tobytes()


class TowerMemo:
    def __init__(self, limit_bytes: int):
        self.limit = limit_bytes
        self.store: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
        self.nbytes = 0
        self.hits = self.misses = self.disk_hits = 0
        # tower module -> (tensor identities and versions, fingerprint); weak, so a freed model's
        # entry can never be mistaken for a new model that reuses its memory.
        self._fingerprints: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[Any, ...], str | None]] = weakref.WeakKeyDictionary()

    def fingerprint(self, model: nn.Module, extractor: Any) -> str | None:
        """SHA-256 of the tower's tensors and the extractor's settings; None for quantized towers."""
        tower = arch.audio_tower(model)
        if any(type(m).__module__.startswith(("bitsandbytes", "hqq")) for m in tower.modules()):
            return None  # quantized towers (their tensors may be inference tensors, without versions)
        tensors = list(tower.state_dict().items())
        # Tensor versions change on every in-place update (optimizer steps, merges): recompute then.
        versions = tuple((t.data_ptr(), t._version) for _, t in tensors) + (id(extractor),)
        cached = self._fingerprints.get(tower)
        if cached is not None and cached[0] == versions:
            return cached[1]
        h = hashlib.sha256()
        settings = {k: getattr(extractor, k, None) for k in ("feature_size", "sampling_rate", "hop_length", "n_fft", "n_samples")}
        h.update(json.dumps([type(extractor).__name__, settings], sort_keys=True).encode())
        for name, t in tensors:
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            h.update(_tensor_bytes(t))
        fp = h.hexdigest()
        self._fingerprints[tower] = (versions, fp)
        return fp

    def get(self, fp: str, key: str) -> torch.Tensor | None:
        out = self.store.get((fp, key))
        if out is not None:
            self.store.move_to_end((fp, key))
            return out
        path = self._disk_path(fp, key)
        if path is not None and os.path.isfile(path):
            out = torch.load(path, map_location="cpu", weights_only=True)
            self.disk_hits += 1
            self._keep(fp, key, out)
        return out

    def put(self, fp: str, key: str, value: torch.Tensor) -> None:
        path = self._disk_path(fp, key)
        if path is not None and not os.path.isfile(path):
            buf = io.BytesIO()
            torch.save(value.contiguous(), buf)
            atomic_write_bytes(Path(path), buf.getvalue())
        self._keep(fp, key, value)

    @staticmethod
    def _disk_path(fp: str, key: str) -> str | None:
        root = os.environ.get(MEMO_DIR_ENV)
        return os.path.join(root, fp, f"{key}.pt") if root else None

    def _keep(self, fp: str, key: str, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.limit or (fp, key) in self.store:
            return
        self.store[(fp, key)] = value
        self.nbytes += size
        while self.nbytes > self.limit:
            _, old = self.store.popitem(last=False)
            self.nbytes -= old.numel() * old.element_size()

    def clear(self) -> None:
        self.store.clear()
        self._fingerprints.clear()
        self.nbytes = self.hits = self.misses = self.disk_hits = 0


MEMO = TowerMemo(int(float(os.environ.get(MEMO_ENV, "2048")) * 2**20))

BATCH_ENV = "STCOMPRESS_TOWER_BATCH"
_BUCKET_FRAMES = 100  # 1 s of mel frames: batched clips run their own length rounded up to this


def tower_batch(model: nn.Module) -> int:
    """Clips per tower call: STCOMPRESS_TOWER_BATCH, else 16 on CUDA (short clips alone are
    launch-bound there) and 1 on the CPU (where batching gains little, and today's outputs stay)."""
    if os.environ.get(BATCH_ENV):
        return max(1, int(os.environ[BATCH_ENV]))
    return 16 if arch.audio_tower(model).conv1.weight.device.type == "cuda" else 1


@torch.no_grad()
def tower_outputs(model: nn.Module, extractor: Any, audios: Sequence[np.ndarray], on_batch: Any = None,
                  remember: bool = True, batch: int | None = None) -> list[torch.Tensor]:
    """Audio-tower output per clip, (n_audio_tokens, d_audio) on the CPU, from MEMO where possible.

    A clip's output must be a function of the clip and the tower only, whichever clips it is
    computed with: a resumed `run` finds other clips in the memo than an uninterrupted one, and
    would otherwise train to a different adapter. Trimmed to a batch's longest clip, the kernels
    would see shapes set by the other clips, which moves the last bits (1e-6 on CPU). So with
    `batch` 1 (`tower_batch`) each clip runs alone; with more, clips of the same length bucket
    (1 s) run together, each bucket with exactly its frames and every call with exactly `batch`
    rows (filled up with copies), so every kernel sees the same shapes whatever the grouping.
    `on_batch(n)` is called with the number of clips finished (progress bars).
    """
    fp = MEMO.fingerprint(model, extractor) if remember and MEMO.limit > 0 else None
    keys = [clip_key(a) for a in audios]
    out: list[torch.Tensor | None] = [MEMO.get(fp, k) if fp else None for k in keys]
    todo = [i for i, o in enumerate(out) if o is None]
    MEMO.hits += len(audios) - len(todo)
    MEMO.misses += len(todo)
    if on_batch is not None and len(audios) > len(todo):
        on_batch(len(audios) - len(todo))
    batch = tower_batch(model) if batch is None else batch
    done = (lambda i, t: None) if not fp else (lambda i, t: MEMO.put(fp, keys[i], t))
    if batch == 1:
        for i in todo:
            out[i] = _one_clip(model, extractor, audios[i])
            done(i, out[i])
            if on_batch is not None:
                on_batch(1)
        return out  # type: ignore[return-value]
    for start in range(0, len(todo), 16 * batch):  # features of a bounded number of clips at once
        part = todo[start : start + 16 * batch]
        for idx, states in _bucketed(model, extractor, [audios[i] for i in part], batch):
            for j, t in zip(idx, states):
                out[part[j]] = t
                done(part[j], t)
            if on_batch is not None:
                on_batch(len(idx))
    return out  # type: ignore[return-value]


def _bucketed(model: nn.Module, extractor: Any, audios: Sequence[np.ndarray], batch: int) -> Any:
    """(indices, outputs) per tower call: clips grouped by length bucket, `batch` rows a call."""
    feats = extractor(list(audios), sampling_rate=SAMPLE_RATE, padding="max_length", truncation=True,
                      return_attention_mask=True, return_tensors="pt")
    frames = [arch.tower_frames(int(n), _BUCKET_FRAMES) for n in feats["attention_mask"].sum(-1)]
    for bucket in sorted(set(frames)):
        members = [i for i, f in enumerate(frames) if f == bucket]
        for s in range(0, len(members), batch):
            idx = members[s : s + batch]
            rows = idx + [idx[0]] * (batch - len(idx))
            states, lengths = arch.tower_states(model, feats["input_features"][rows], feats["attention_mask"][rows],
                                                frames=bucket)
            yield idx, [states[j, : int(lengths[j])].to("cpu").clone() for j in range(len(idx))]


def _one_clip(model: nn.Module, extractor: Any, audio: np.ndarray) -> torch.Tensor:
    feats = extractor([audio], sampling_rate=SAMPLE_RATE, padding="max_length", truncation=True,
                      return_attention_mask=True, return_tensors="pt")
    states, lengths = arch.tower_states(model, feats["input_features"], feats["attention_mask"])
    return states[0, : int(lengths[0])].to("cpu").clone()
