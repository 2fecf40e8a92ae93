"""Loading Qwen2-Audio models and processors: the only `from_pretrained` in stcompress."""

from __future__ import annotations

import importlib.util
import json
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from packaging.version import Version

from stcompress.config import ModelConfig
from stcompress.errors import ModelError
from stcompress.model import attention

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
    from stcompress.preflight import is_hub_id

    if is_hub_id(path):
        return path  # hub id such as Qwen/Qwen2-Audio-7B-Instruct
    check_model_dir(local)
    return str(local.resolve())  # manifests record where it is, whatever the working directory


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


def _load_errors() -> tuple[type[BaseException], ...]:
    from safetensors import SafetensorError

    return (OSError, ValueError, SafetensorError, pickle.UnpicklingError, EOFError)


_LOAD_ERRORS = _load_errors()  # json.JSONDecodeError is a ValueError


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def weight_file_problem(directory: Path) -> str | None:
    """The first weight file of a local model that cannot be read, and why (None: all read)."""
    from safetensors import safe_open

    for index in sorted(directory.glob("*.index.json")):
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            return f"{index} is not a readable shard index ({_first_line(exc)}); copy it again from the source"
        missing = sorted(s for s in shards if not (directory / s).is_file())
        if missing:
            return f"{directory / missing[0]} is missing (listed in {index.name}): the download or copy is incomplete; fetch it again"
    for file in sorted(directory.glob("*.safetensors")):
        problem = _safetensors_problem(file)
        if problem:
            return problem
    return None


_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header


def _safetensors_problem(file: Path) -> str | None:
    """Truncation is told by sizes (the file declares its header length and every tensor's end
    offset); any other damage by safetensors itself."""
    from safetensors import safe_open

    size = file.stat().st_size
    needed = 8
    try:
        with file.open("rb") as f:
            n = int.from_bytes(f.read(8), "little") if size >= 8 else 0
            if size >= 8 and n < _MAX_HEADER:
                needed = 8 + n
                if size >= needed:
                    header = json.loads(f.read(n))
                    ends = [e["data_offsets"][1] for k, e in header.items() if k != "__metadata__"]
                    needed += max(ends, default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        pass  # not a safetensors layout: safe_open below says so
    if size < needed:
        return (f"{file} is truncated ({size:,} of {needed:,} bytes): the download or copy stopped early or the disk "
                "filled up; free space and fetch the file again")
    try:
        with safe_open(str(file), framework="pt") as f:
            next(iter(f.keys()), None)
    except Exception as exc:  # safetensors raises its own error type for every kind of damage
        return f"{file} is not a valid safetensors file ({_first_line(exc)}): it is corrupt or in another format; fetch it again"
    return None


def load_failure(path: str, exc: BaseException) -> ModelError:
    """One line for a failed from_pretrained: the damaged file and the likely cause when local."""
    local = Path(path)
    if local.is_dir():
        problem = weight_file_problem(local)
        if problem:
            return ModelError(f"model.path: cannot load {path}: {problem}")
        return ModelError(
            f"model.path: cannot load {path} ({type(exc).__name__}: {_first_line(exc)}); a file is corrupt, incomplete or "
            "not written by save_pretrained: check config.json and the weight files, or save the model again"
        )
    return ModelError(f"model.path: cannot load {path!r} ({_first_line(exc)}); check the hub id, the network, or the directory")


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


_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def saved_quantization(path: str) -> tuple[dict[str, Any] | None, str | None]:
    """A local checkpoint's `quantization_config` and saved dtype name (None, None for a hub id)."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return None, None
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, None  # from_pretrained reports it, with the file named (load_failure)
    dtype = config.get("dtype") or config.get("torch_dtype") or config.get("text_config", {}).get("dtype")
    quant = config.get("quantization_config")
    return (quant if isinstance(quant, dict) else None), (dtype if isinstance(dtype, str) else None)


def resolve_dtype(name: str, device: torch.device, *, path: str | None = None) -> torch.dtype | str:
    """A torch dtype, or "auto" (transformers' word for: the dtype the checkpoint was saved in).

    A 4-bit checkpoint (an NF4 export) loads in the dtype it was saved in under "auto": its
    non-quantized tensors and compute dtype were chosen together, and bitsandbytes models cannot
    be cast afterwards (fp32 on CPU left bf16 activations meeting fp32 conv biases), so another
    explicit dtype is refused for them; HQQ checkpoints load in any dtype (4.57's loader computes in fp32).
    """
    quant, saved = saved_quantization(path) if path else (None, None)
    if name == "checkpoint":
        return "auto"
    if name == "auto":
        if quant is not None:
            return "auto"
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if quant is not None and quant.get("quant_method") == "bitsandbytes" and saved in _DTYPES and name != saved:
        raise ModelError(
            f"model.dtype: {path} is a {quant.get('quant_method', 'quantized')} checkpoint saved in {saved}; "
            f"it cannot be loaded in {name}: leave model.dtype at auto (or pass --model.dtype {saved})"
        )
    return _DTYPES[name]


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


def decompress(model: Any) -> None:
    """A compressed-tensors checkpoint (quantize: autoround) loads with its weights packed and a hook
    that unpacks them on the model's first forward; stcompress's engine calls the parts (tower,
    decoder) directly, so the library's own decompression runs here, once: the same dense weights."""
    quantizer = getattr(model, "hf_quantizer", None)
    if getattr(model, "ct_decompress_hook", None) is not None and hasattr(quantizer, "compressor"):
        quantizer.compressor.decompress_model(model)


class OncePerMessage(logging.Filter):
    """Lets each distinct message through once. bitsandbytes' LLM.int8 logs the same cast warning
    ("MatMul8bitLt: inputs will be cast from torch.bfloat16 to float16") on every matmul of every
    forward: 34,804 lines in one testbed sweep, burying the run's own log."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


REPEATING_LOGGERS = ("bitsandbytes.autograd._functions",)


def quiet_repeats() -> None:
    """Install `OncePerMessage` on the third-party loggers that repeat per matmul (idempotent)."""
    for name in REPEATING_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, OncePerMessage) for f in logger.filters):
            logger.addFilter(OncePerMessage())


def load_model(cfg: ModelConfig, *, quantization: Any | None = None) -> LoadedModel:
    """Load model + processor; `quantization` (a transformers quantization config: export's formats)
    replaces the paper's NF4 default of cfg.load_in_4bit."""
    device = resolve_device(cfg.device)
    check_options(cfg, device)
    path = resolve_model_path(cfg.path)
    dtype = resolve_dtype(cfg.dtype, device, path=path)
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
    except _LOAD_ERRORS as exc:
        raise load_failure(path, exc) from None
    if "device_map" not in kwargs and not getattr(model, "is_loaded_in_8bit", False):  # int8 refuses .to; loads on CPU
        model.to(device)
    if getattr(model, "is_quantized", False) or getattr(model, "is_loaded_in_8bit", False):
        quiet_repeats()
    decompress(model)
    attention.materialise_single_kv(model)  # one KV head: K/V materialised for SDPA (a CUDA kernel fault)
    model.eval()
    return LoadedModel(model=model, processor=processor, path=path, device=device, dtype=model.dtype)
