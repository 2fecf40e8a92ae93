"""The calibrated 4-bit export (`quantize: autoround`): auto-round tunes each decoder layer's
rounding on the run's own audio, compressed-tensors stores it.

Chosen by measurement (pip, CPU, tiny Qwen2-Audio; the candidates issue 12 named first could not
be installed beside our pins):

| library | installs with torch 2.13 + transformers 5.23 / 4.57 | why not |
|---|---|---|
| llmcompressor 0.14.0.1 (GPTQ) | no / no | requires transformers >=5.15,<=5.17 (every release pins one narrow range) |
| gptqmodel 7.7.0 (GPTQ) | no / no | requires torch >=2.14.1 (pip pulls 3 GB of CUDA wheels) and transformers >=5.20.2 |
| auto-round 0.16.1 (AutoRound, RTN) | yes / yes | (chosen: +2 small packages on 5.x, +6 on 4.57, 19 MB) |

AutoRound (Cheng et al., "Optimize Weight Rounding via Signed Gradient Descent", 2023) is a
calibrated weight-only method like GPTQ: block by block it feeds the calibration inputs through
the full-precision and the quantized layer and tunes the rounding and clipping to match their
outputs. It writes the compressed-tensors `pack-quantized` format ("llm_compressor" in auto-round):
int4 codes eight to an int32, one fp16 scale per group of 128 input weights, symmetric; what vLLM
serves with its Marlin kernels and what transformers reloads through compressed-tensors (decompressed
to dense weights in memory: the saving is on disk, not in RAM or speed; measured on CPU with both
families: the reloaded model's logits equal the in-memory quantized model's exactly).

Calibration: `calibration_samples` (clip, reference) pairs of the run's data, encoded exactly as
training encodes them (stcompress.prompt: the inference chat prompt with the clip's audio tokens,
then the reference and <|im_end|>) with the clip's mel features, so the decoder is calibrated on the
audio-spliced hidden states it sees when it translates. Only the LM decoder layers are quantized
(the audio tower, projector, embeddings and LM head stay in the export dtype).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from stcompress.config import ExportConfig
from stcompress.data.example import Example
from stcompress.data.sources import load_examples
from stcompress.data.training import reference_items
from stcompress.errors import DataError, ModelError
from stcompress.model.save import make_config_portable, make_processor_files_portable
from stcompress.prompt import PromptBuilder
from stcompress.training.collate import Collator, encode_items

log = logging.getLogger(__name__)

GROUP_SIZE = 128
# compressed-tensors `ignore` entries as regexes, so one saved config names the kept components in
# the 4.5x and the 5.x module paths alike (auto-round writes the on-disk 4.5x names only, and 5.x
# would then expect packed weights for a kept LM head).
_KEEP_PATTERNS = {
    "audio_tower": r"re:.*audio_tower\..*",
    "projector": r"re:.*multi_modal_projector\..*",
    "lm_head": r"re:.*lm_head$",
}


def calibration_data(cfg: ExportConfig) -> Any:
    """The data section the calibration pairs come from: the run's `data`, its `calibration_subset`
    (train by default), or `calibration_dataset` when given."""
    return dataclasses.replace(cfg.data, dataset=cfg.calibration_dataset or cfg.data.dataset,
                               subset=cfg.calibration_subset, limit=cfg.calibration_samples)


def calibration_examples(cfg: ExportConfig) -> list[Example]:
    """Loaded before any model: no usable pair is an error naming the options."""
    data = calibration_data(cfg)
    examples = [ex for ex in load_examples(data, on_error="skip").examples if any(r.strip() for r in ex.references)]
    if not examples:
        raise DataError(
            f"calibration: no segments with audio and a reference in {data.dataset} (subset {data.subset}); "
            "point --calibration-dataset / --calibration-subset at the run's training or dev data"
        )
    return examples


def calibration_batches(processor: Any, examples: Sequence[Example], cfg: ExportConfig) -> list[dict[str, torch.Tensor]]:
    """One model input per pair, as training builds it (prompt + reference, mel features), labels
    dropped: at most `calibration_samples` pairs, the first reference of each clip first."""
    items = sorted(reference_items(list(examples)), key=lambda item: not item.id.endswith("#0"))[: cfg.calibration_samples]
    builder = PromptBuilder(processor, cfg.prompt)
    encoded, _ = encode_items(items, builder, processor.feature_extractor, max_length=1 << 20, long_audio="truncate",
                              what="calibration data")
    tok = processor.tokenizer
    collate = Collator(processor.feature_extractor, tok.pad_token_id, tok.convert_tokens_to_ids("<|AUDIO|>"))
    batches = []
    for e in encoded:
        batch = collate([e])
        batch.pop("labels")
        batches.append(batch)
    return batches


@contextlib.contextmanager
def _library_run() -> Iterator[None]:
    """auto-round calls gc.collect() after every step; with the Python objects a loaded model,
    processor and data leave behind, a call took ~1.8 s on 2 CPU cores (measured: 42 of 69 s of a
    tiny model's quantization). Objects that exist before quantization are moved out of the
    collector's reach for its duration (gc.freeze)."""
    gc.collect()
    gc.freeze()
    library_log = logging.getLogger("autoround")  # its per-layer INFO lines follow stcompress's -q / -v
    level = library_log.level
    library_log.setLevel(max(log.getEffectiveLevel(), logging.INFO))
    try:
        yield
    finally:
        gc.unfreeze()
        library_log.setLevel(level)


def _device_map(device: torch.device) -> Any:
    return "cpu" if device.type == "cpu" else (device.index or 0)


def autoround_quantize(model: torch.nn.Module, processor: Any, batches: Sequence[Mapping[str, torch.Tensor]],
                       bits: int, group_size: int, iters: int, out: Path) -> dict[str, Any]:
    """Quantize the decoder layers of `model` in place (they keep their fake-quantized weights, what
    the saved codes decode to) and write the compressed-tensors checkpoint to `out`."""
    from auto_round import AutoRound

    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    with _library_run():
        ar = AutoRound(model, tokenizer=processor.tokenizer, processor=processor, scheme=f"W{bits}A16",
                       group_size=group_size, sym=True, dataset=list(batches), nsamples=len(batches), batch_size=1,
                       iters=iters, device_map=_device_map(device), enable_torch_compile=False, seed=0)
        try:
            ar.quantize()
        except SystemExit:  # auto-round exits the process when no calibration forward pass succeeded
            raise ModelError("quantize autoround: no calibration sample ran through the model (auto-round logged "
                             "why above); check the calibration data") from None
        if next(model.parameters()).dtype != dtype:  # on CPU auto-round computes (and leaves the model) in fp32
            model.to(dtype)
        if next(model.parameters()).device != device:  # blocks it moved while tuning come back for the check
            model.to(device)
        ar.save_quantized(output_dir=str(out), format="llm_compressor", inplace=False)
    portable_ignore(out)
    cast_kept_tensors(out, dtype)
    make_config_portable(out)
    make_processor_files_portable(out, processor)
    return {"library": "auto-round", "algorithm": "AutoRound (signed-gradient rounding)" if iters else "RTN",
            "iters": iters, "samples": len(batches), "scheme": f"W{bits}A16", "group_size": group_size,
            "symmetric": True, "stored_as": "compressed-tensors pack-quantized"}


def portable_ignore(out: Path) -> None:
    """Name the components left in the export dtype by pattern, for both module layouts."""
    for name in ("config.json", "quantization_config.json"):
        path = out / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        q = data.get("quantization_config", data)
        q["ignore"] = list(_KEEP_PATTERNS.values())
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")



_QUANT_PARAMS = (".weight_packed", ".weight_scale", ".weight_zero_point", ".weight_shape", ".weight_global_scale")
_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def cast_kept_tensors(out: Path, dtype: torch.dtype) -> None:
    """auto-round tunes in fp32 on CPU and its file keeps every tensor it did not quantize in fp32
    (measured: a bf16 export came out with an fp32 LM head and embeddings, twice their size); they
    go back to the export dtype here, the codes and scales stay as written."""
    from safetensors.torch import load_file, save_file

    if dtype == torch.float32:
        return
    for file in sorted(out.glob("*.safetensors")):
        tensors = load_file(str(file))
        if not any(t.dtype == torch.float32 and not n.endswith(_QUANT_PARAMS) for n, t in tensors.items()):
            continue
        cast = {n: t.to(dtype) if t.dtype == torch.float32 and not n.endswith(_QUANT_PARAMS) else t for n, t in tensors.items()}
        tmp = file.with_name(f".{file.name}.tmp")
        save_file(cast, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, file)
    path = out / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    for node in (config, *(v for v in config.values() if isinstance(v, dict) and "model_type" in v)):
        node["dtype"] = node["torch_dtype"] = _DTYPE_NAMES[dtype]
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
