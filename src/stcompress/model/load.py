"""Loading Qwen2-Audio models and processors: the only `from_pretrained` in stcompress."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from packaging.version import Version

from stcompress.config import ModelConfig
from stcompress.errors import ModelError

log = logging.getLogger(__name__)

_TF_VERSION = Version(transformers.__version__)
_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")
_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json")


@dataclass
class LoadedModel:
    model: Any  # Qwen2AudioForConditionalGeneration
    processor: Any  # Qwen2AudioProcessor
    path: str  # what was loaded (resolved local dir or hub id)
    device: torch.device
    dtype: torch.dtype

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer


def resolve_model_path(path: str) -> str:
    """A local directory, a built-in tiny model, or a hub id (passed through untouched)."""
    if path.startswith("builtin:"):
        from stcompress.model.tiny import resolve_builtin

        return str(resolve_builtin(path.split(":", 1)[1]))
    local = Path(path).expanduser()
    looks_local = local.exists() or path.startswith((".", "/", "~")) or path.count("/") > 1
    if not looks_local:
        return path  # hub id such as Qwen/Qwen2-Audio-7B-Instruct
    check_model_dir(local)
    return str(local)


def check_model_dir(directory: Path) -> None:
    """Fail early, with the fix, when a local model directory cannot be loaded."""
    item = f"model.path: {directory}"
    if not directory.is_dir():
        raise ModelError(f"{item} does not exist; give a saved model directory or a hub id such as Qwen/Qwen2-Audio-7B-Instruct")
    if not (directory / "config.json").is_file():
        raise ModelError(f"{item} has no config.json; point to a directory written by save_pretrained (or by stcompress)")
    if not any(any(directory.glob(p)) for p in _WEIGHT_PATTERNS):
        raise ModelError(f"{item} has no weight files (*.safetensors or *.bin); the save was incomplete, save the model again")
    if not any((directory / f).is_file() for f in _PROCESSOR_FILES):
        raise ModelError(
            f"{item} has no preprocessor_config.json; copy the processor files from the base model "
            "(processor.save_pretrained(dir))"
        )
    if not any((directory / f).is_file() for f in _TOKENIZER_FILES):
        raise ModelError(f"{item} has no tokenizer files; copy them from the base model (processor.save_pretrained(dir))")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ModelError(f"model.device: unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(f"model.device: {name} was asked for but no CUDA device is available; use --model.device cpu (or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ModelError(f"model.device: {name} does not exist ({torch.cuda.device_count()} CUDA devices); pick an index below that")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype | str:
    """A torch dtype, or "auto" (transformers' word for: the dtype the checkpoint was saved in)."""
    if name == "checkpoint":
        return "auto"
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def check_options(cfg: ModelConfig, device: torch.device) -> None:
    """Options that cannot work on this machine get a one-line error before anything loads."""
    if cfg.attn_implementation == "flash_attention_2" and device.type != "cuda":
        raise ModelError("model.attn_implementation: flash_attention_2 needs a CUDA device; use sdpa or eager on CPU")
    if cfg.device_map is not None and cfg.device_map != "cpu" and not torch.cuda.is_available():
        raise ModelError(f"model.device_map: {cfg.device_map!r} needs CUDA devices and none is available; leave it unset on CPU")
    if cfg.load_in_4bit and importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError("model.load_in_4bit: bitsandbytes is not installed; pip install 'stcompress[quant]'")


def quantization_config(compute_dtype: torch.dtype, keep: tuple[str, ...] | None = None) -> Any:
    """The paper's QLoRA quantization: NF4, double quantization, bf16 compute. `keep`: components
    left in full precision (None: transformers' default, the LM head)."""
    from stcompress.model import arch

    q = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )
    if keep is not None:
        q.llm_int8_skip_modules = arch.quantization_skip_patterns(keep)
    return q


def load_model(cfg: ModelConfig, *, quantization: Any | None = None) -> LoadedModel:
    """Load model + processor; `quantization` (a transformers quantization config: export's formats)
    replaces the paper's NF4 default of cfg.load_in_4bit."""
    device = resolve_device(cfg.device)
    check_options(cfg, device)
    dtype = resolve_dtype(cfg.dtype, device)
    path = resolve_model_path(cfg.path)
    kwargs: dict[str, Any] = {("dtype" if _TF_VERSION >= Version("4.56") else "torch_dtype"): dtype}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    elif cfg.load_in_4bit:
        compute = dtype if isinstance(dtype, torch.dtype) else torch.float32
        kwargs["quantization_config"] = quantization_config(torch.bfloat16 if device.type == "cuda" else compute)
    if cfg.device_map is not None:
        kwargs["device_map"] = cfg.device_map
    elif "quantization_config" in kwargs:
        kwargs["device_map"] = {"": device}
    log.info("loading %s (%s, %s%s)", path, dtype, device, ", 4-bit" if cfg.load_in_4bit else "")
    try:
        model = transformers.Qwen2AudioForConditionalGeneration.from_pretrained(path, **kwargs)
        processor = transformers.AutoProcessor.from_pretrained(path)
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"model.path: cannot load {path!r} ({first}); check the hub id or directory") from None
    if "device_map" not in kwargs and not getattr(model, "is_loaded_in_8bit", False):  # int8 refuses .to; loads on CPU
        model.to(device)
    model.eval()
    return LoadedModel(model=model, processor=processor, path=path, device=device, dtype=model.dtype)
