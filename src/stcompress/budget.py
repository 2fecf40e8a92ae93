"""`--size-budget`: the export configuration predicted to fit N bytes, and the rule that picks it.

Sizes: `4GB` is 4 x 10^9 bytes (decimal, as the IWSLT track counts and bins); `1.5GiB` is
1.5 x 2^30; `500MB`, `750kB`, a bare number is bytes.

The space: kept decoder layers (the first K of an importance search's removal order, K = 0 ..
all; only the input's own layers without one) x format (none, int8, nf4, hqq: those this
environment writes, or `budget_formats`) x bits of the decoder layers, LM head, audio tower and
projector (each a width the format stores, or 16 = kept in the export dtype; bitsandbytes always
quantizes the decoder; hqq's 1-bit is left out, and widths below `budget_min_bits`) x vocabulary (not trimmed, or a trimmed size).
int8 configurations that would fail on CUDA are left out (quantize.INT8_OUT_MULTIPLE: an int8 LM
head whose rows are not a multiple of 4, e.g. an untrimmed vocabulary of 35,935 rows).
Options the user set are fixed: `quantize` other than none (the format), `bits` (those
components), `num_layers` (the layers). Sizes come from `stcompress.sizes.predict`, exact for the
tensors; a candidate fits when its predicted bytes plus MARGIN (headers, torch.save's zip records)
are within the budget on the measures asked for (safetensors files, torch.save, or both).

The rule (`preference`): among candidates that fit, (1) more kept decoder layers; (2) higher bits
for the weaker of the LM head and the decoder layers; (3) higher decoder bits; (4) higher LM-head
bits; (5) higher audio-tower bits, then projector bits; (6) the full vocabulary over a trimmed one;
(7) the earlier format in the format list (default none, int8, nf4, hqq: the formats both
transformers families reload first); (8) the smaller predicted size.
"""

from __future__ import annotations

import copy
import importlib.util
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import product
from typing import Any

import transformers
from packaging.version import Version

from stcompress import sizes
from stcompress.model import arch
from stcompress.quantize import KEEP, check_library, int8_misfits

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*((?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*([A-Za-z]*)\s*$")
SIZE_HELP = "write e.g. 4GB (GB = 10^9 bytes, as the IWSLT track counts), 1.5GiB (2^30 bytes) or 500MB"
MARGIN = 0.01  # predicted tensor bytes + 1%: safetensors headers, torch.save's per-tensor zip records
FORMAT_ORDER = ("none", "int8", "nf4", "hqq")
VARIED = ("decoder_layers", "lm_head", "audio_tower", "projector")  # embed_tokens stays in dtype
PICK_BITS = {"none": (KEEP,), "int8": (8, KEEP), "nf4": (4, KEEP), "hqq": (8, 4, 3, 2, KEEP)}
MEASURES = ("both", "safetensors", "torch_save")


def parse_size(text: str) -> int:
    """'4GB' -> 4_000_000_000; ValueError naming the text and the accepted forms."""
    match = _SIZE.match(str(text))
    unit = match.group(2).lower() if match else None
    if not match or unit not in UNITS:
        raise ValueError(f"size_budget: {text!r} is not a size; {SIZE_HELP}")
    value = int(float(match.group(1)) * UNITS[unit])
    if value <= 0:
        raise ValueError(f"size_budget: {text!r} is not a positive size; {SIZE_HELP}")
    return value


def show_size(n: int) -> str:
    """Decimal units, as the track's bins count them."""
    return f"{n / 1e9:.3f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n:,} bytes"


@dataclass(frozen=True)
class Candidate:
    """One export configuration and its predicted bytes."""

    fmt: str  # none | int8 | nf4 | hqq
    bits: tuple[tuple[str, int], ...]  # (component, bits) for every quantize.BITS_COMPONENTS entry
    num_layers: int  # layers removed from the importance order (its first num_layers); 0: none
    kept_layers: int
    vocab_size: int | None  # None: the full vocabulary; else the trimmed row count
    predicted: int  # bytes of the safetensors tensors
    predicted_torch_save: int  # bytes of the state dict as the reloaded model holds it

    def bit(self, component: str) -> int:
        return dict(self.bits)[component]

    def bits_spec(self) -> str:
        """The `--bits` value of this candidate (every varied component named)."""
        return ",".join(f"{c}={self.bit(c)}" for c in VARIED)

    def describe(self) -> str:
        trimmed = f", vocabulary trimmed to {self.vocab_size:,}" if self.vocab_size else ""
        bits = "bf16" if self.fmt == "none" else f"{self.fmt} {self.bits_spec()}"
        return f"{self.kept_layers} decoder layers, {bits}{trimmed}"


def preference(c: Candidate, formats: Sequence[str] = FORMAT_ORDER) -> tuple:
    """Sort key of the rule in the module docstring: the larger key is preferred."""
    dec, head = c.bit("decoder_layers"), c.bit("lm_head")
    return (c.kept_layers, min(dec, head), dec, head, c.bit("audio_tower"), c.bit("projector"), c.vocab_size is None,
            -list(formats).index(c.fmt), -c.predicted)


def fits(c: Candidate, budget: int, measure: str = "both") -> bool:
    needed = {"safetensors": c.predicted, "torch_save": c.predicted_torch_save,
              "both": max(c.predicted, c.predicted_torch_save)}[measure]
    return needed * (1 + MARGIN) <= budget


def choose(candidates: Iterable[Candidate], budget: int, measure: str = "both",
           formats: Sequence[str] = FORMAT_ORDER) -> Candidate | None:
    """The preferred candidate among those that fit; None when none does."""
    fitting = [c for c in candidates if fits(c, budget, measure)]
    return max(fitting, key=lambda c: preference(c, formats)) if fitting else None


def available_formats() -> tuple[str, ...]:
    """Formats this environment writes and reloads (stcompress.quantize.check_library's rules)."""
    out = ["none"]
    if importlib.util.find_spec("bitsandbytes") is not None:
        out += ["int8", "nf4"]
    if importlib.util.find_spec("hqq") is not None and Version(transformers.__version__) < Version("5"):
        out.append("hqq")
    return tuple(out)


def layer_options(order: Sequence[int], present: Sequence[int], fixed: int | None = None) -> list[tuple[int, list[int]]]:
    """(K, layers of `present` that the first K of `order` remove) for each distinct kept count,
    smallest K first; `fixed`: that K only. Layers are in the original numbering."""
    out, seen = [], set()
    for k in ([fixed] if fixed is not None else range(len(order) + 1)):
        removed = [i for i in order[:k] if i in set(present)]
        kept = len(present) - len(removed)
        if kept >= 1 and kept not in seen:
            seen.add(kept)
            out.append((k, removed))
    return out


def _bit_choices(fmt: str, fixed: Mapping[str, int], min_bits: int = 2) -> list[dict[str, int]]:
    values = {c: (fixed[c],) if c in fixed else tuple(b for b in PICK_BITS[fmt] if b >= min_bits) for c in VARIED}
    if fmt in ("int8", "nf4") and "decoder_layers" not in fixed:
        values["decoder_layers"] = tuple(b for b in PICK_BITS[fmt][:1] if b >= min_bits)  # bitsandbytes always quantizes it
    return [dict(zip(VARIED, combo)) for combo in product(*(values[c] for c in VARIED))]


class SizeTable:
    """Predicted bytes per component at each (format, bits, dtype, vocabulary), computed once each
    through sizes.predict (a meta-device model: no weights) and summed per candidate."""

    def __init__(self, config: Any, dtype: str, group_size: int,
                 predict: Callable[..., dict[str, int]] = sizes.predict) -> None:
        self.config, self.dtype, self.group_size, self._predict = config, dtype, group_size, predict
        self.layers = arch.text_config(config).num_hidden_layers
        self._memo: dict[tuple, dict[str, int]] = {}
        self._shapes: dict[int | None, list[tuple[str, str, int, int]]] = {}

    def runs(self, fmt: str, bits: Mapping[str, int], vocab: int | None) -> bool:
        """Whether the configuration runs on CUDA: no int8 layer bitsandbytes cannot multiply
        (quantize.INT8_OUT_MULTIPLE: an untrimmed LM head of an unaligned vocabulary)."""
        if fmt != "int8":
            return True
        if vocab not in self._shapes:
            self._shapes[vocab] = arch.linear_shapes(arch.meta_model(self.config, vocab))
        return not int8_misfits(self._shapes[vocab], bits)

    def _at(self, fmt: str, bits: int, dtype: str, vocab: int | None) -> dict[str, int]:
        key = ("none" if bits == KEEP else fmt, bits, dtype, vocab)
        if key not in self._memo:
            config = self.config
            if vocab is not None:  # trimmed: the embedding and LM head rows (h1's predict(vocab_size=) does this too)
                config = copy.deepcopy(config)
                arch.text_config(config).vocab_size = vocab
            chosen = dict.fromkeys((*VARIED, "embed_tokens"), bits)
            self._memo[key] = self._predict(config, key[0], chosen, dtype, self.group_size)
        return self._memo[key]

    def total(self, fmt: str, bits: Mapping[str, int], kept: int, vocab: int | None, dtype: str | None = None) -> int:
        dtype = dtype or self.dtype
        keep = self._at(fmt, KEEP, dtype, vocab)
        n = keep["embed_tokens"] + keep["other"]
        for c in VARIED:
            size = self._at(fmt, bits[c], dtype, vocab)[c]
            n += size * kept // self.layers if c == "decoder_layers" else size
        return n


def reload_dtype(fmt: str, dtype: str) -> str:
    """The dtype a reloaded export computes in: transformers 4.57's HQQ loader uses float32."""
    return "float32" if fmt == "hqq" else dtype


def candidates(table: SizeTable, formats: Sequence[str], fixed_bits: Mapping[str, int],
               layers: Sequence[tuple[int, list[int]]], present: int, vocabs: Sequence[int | None] = (None,),
               min_bits: int = 2) -> Iterator[Candidate]:
    """Every configuration of the space (module docstring), no picked width below `min_bits`."""
    for fmt in formats:
        for bits in _bit_choices(fmt, fixed_bits, min_bits):
            full = tuple((c, bits.get(c, KEEP)) for c in ("audio_tower", "projector", "decoder_layers", "lm_head",
                                                          "embed_tokens"))
            for (k, removed), vocab in product(layers, vocabs):
                if not table.runs(fmt, bits, vocab):
                    continue
                kept = present - len(removed)
                yield Candidate(fmt, full, k, kept, vocab, table.total(fmt, bits, kept, vocab),
                                table.total(fmt, bits, kept, vocab, reload_dtype(fmt, table.dtype)))


# ---------------------------------------------------------------------------------------------
# The export's plan: layers to remove and, with a size budget, the picked configuration


@dataclass
class Plan:
    """What export does beyond its options: layers to remove (original numbering) and the pick."""

    removed: list[int]  # decoder layers the importance order removes now (original numbering)
    present: list[int]  # the input's decoder layers (original numbering)
    record: dict[str, Any] | None = None  # the size-budget record for the manifest and card


def read_order(importance: str) -> tuple[list[int], int | None]:
    """An importance search's removal order and the number of decoder layers it ranked."""
    from stcompress.artifacts import read_manifest
    from stcompress.errors import ConfigError

    manifest = read_manifest(importance)
    config = manifest.get("config") or {}
    if manifest.get("stage") != "importance" or config.get("component", "decoder") != "decoder":
        raise ConfigError([f"importance: {importance} is not a decoder-layer importance search "
                           f"(stage {manifest.get('stage')}); give a `stcompress importance` output"])
    return list(manifest.get("removal_order") or []), (manifest.get("model") or {}).get("decoder_layers")


def present_layers(importance: str, layers_now: int, origin: Mapping[str, Any]) -> tuple[list[int], list[int]]:
    """The importance order and the input's layers in its numbering (the lineage's layer map)."""
    from stcompress.errors import ConfigError

    order, ranked = read_order(importance)
    present = list(origin.get("layer_map") or range(layers_now))
    original = len(present) + len(origin.get("removed_layers") or [])
    if len(present) != layers_now or (ranked is not None and ranked != original):
        raise ConfigError([f"importance: {importance} ranks the layers of a {ranked}-layer model, but the input has "
                           f"{layers_now} layers ({original} before pruning); give the importance search of the model "
                           "you export"])
    return order, present


def plan_export(cfg: Any, model_config: Any, origin: Mapping[str, Any], trimmed_rows: int | None = None) -> tuple[Any, Plan]:
    """The export config to run (quantize, bits, num_layers picked under a size budget) and the plan.

    `trimmed_rows`: with `trim_vocab`, the embedding rows the trim will keep (vocab_trim.predicted_rows);
    every candidate is then sized with that vocabulary."""
    import dataclasses

    from stcompress.errors import ConfigError
    from stcompress.quantize import parse_bits

    layers_now = arch.text_config(model_config).num_hidden_layers
    order, present = present_layers(cfg.importance, layers_now, origin) if cfg.importance else ([], list(range(layers_now)))
    if cfg.num_layers is not None and cfg.num_layers > len(order):
        raise ConfigError([f"num_layers: {cfg.num_layers} is more than the {len(order)} layers {cfg.importance} ranked; "
                           "pick one in that range"])
    if cfg.num_layers is not None and not layer_options(order, present, cfg.num_layers):
        raise ConfigError([f"num_layers: removing the first {cfg.num_layers} of the removal order leaves no decoder "
                           "layer; remove fewer"])
    if not cfg.size_budget:
        options = layer_options(order, present, cfg.num_layers or 0)
        return cfg, Plan(removed=options[0][1], present=present)
    budget = parse_size(cfg.size_budget)
    formats = tuple(cfg.budget_formats) or ((cfg.quantize,) if cfg.quantize != "none" else available_formats())
    for fmt in formats:
        check_library(fmt)  # a listed format this environment cannot write: refused by name, before loading
    fixed = parse_bits(cfg.bits)
    layers = layer_options(order, present, cfg.num_layers)
    table = SizeTable(model_config, cfg.dtype, cfg.group_size)
    space = list(candidates(table, formats, fixed, layers, len(present), vocab_options(cfg, model_config, trimmed_rows),
                            cfg.budget_min_bits))
    best = choose(space, budget, cfg.budget_measure, formats)
    if best is None:
        raise ConfigError([no_fit(cfg, budget, space, formats)])
    picked = dataclasses.replace(cfg, quantize=best.fmt, bits="" if best.fmt == "none" else best.bits_spec(),
                                 num_layers=best.num_layers if cfg.importance else cfg.num_layers)
    record = {"budget": cfg.size_budget, "budget_bytes": budget, "measure": cfg.budget_measure, "margin": MARGIN,
              "formats": list(formats), "fixed_bits": fixed, "candidates": len(space),
              "fitting": sum(fits(c, budget, cfg.budget_measure) for c in space),
              "picked": {"format": best.fmt, "bits": dict(best.bits), "num_layers": best.num_layers,
                         "kept_layers": best.kept_layers, "vocab_size": best.vocab_size,
                         "predicted_safetensors": best.predicted, "predicted_torch_save": best.predicted_torch_save,
                         "description": best.describe()}}
    removed = dict(layers)[best.num_layers]
    return picked, Plan(removed=removed, present=present, record=record)


def vocab_options(cfg: Any, model_config: Any, trimmed_rows: int | None = None) -> tuple[int | None, ...]:
    """The vocabulary dimension of the space: (None,) = not trimmed; with `--trim-vocab` the user has
    chosen trimming, so every candidate carries the trimmed row count (the picker never trims on
    its own: the kept texts are the user's decision)."""
    if getattr(cfg, "trim_vocab", False):
        if trimmed_rows is None:
            raise ValueError("size budget with trim_vocab: give the trimmed row count (vocab_trim.predicted_rows)")
        return (trimmed_rows,)
    return (None,)


def no_fit(cfg: Any, budget: int, space: Sequence[Candidate], formats: Sequence[str]) -> str:
    smallest = min(space, key=lambda c: max(c.predicted, c.predicted_torch_save) if cfg.budget_measure == "both"
                   else c.predicted if cfg.budget_measure == "safetensors" else c.predicted_torch_save)
    fixes = ["raise the budget"]
    if not cfg.importance:
        fixes.append("give --importance (a layer-importance search) so layers may be removed")
    missing = [f for f in FORMAT_ORDER if f not in formats]
    if missing:
        fixes.append(f"allow more formats (budget_formats; not tried: {', '.join(missing)}"
                     + ("; hqq needs transformers 4.57" if "hqq" in missing else "") + ")")
    if cfg.bits or cfg.num_layers is not None:
        fixes.append("fix fewer options (bits, num_layers)")
    if cfg.budget_min_bits > 2:
        fixes.append(f"allow lower bits (budget_min_bits {cfg.budget_min_bits})")
    on_files = sum(fits(c, budget, "safetensors") for c in space) if cfg.budget_measure != "safetensors" else 0
    if on_files:
        fixes.append(f"count the files only (--budget-measure safetensors: {on_files:,} configurations fit; "
                     "torch.save counts what the reloaded model holds, fp32 for HQQ on transformers 4.57)")
    return (f"size_budget: {cfg.size_budget} ({budget:,} bytes): no configuration is predicted to fit; the smallest is "
            f"{show_size(max(smallest.predicted, smallest.predicted_torch_save))} ({smallest.describe()}); "
            + ", or ".join(fixes))


def check_fit(cfg: Any, measured: Mapping[str, int]) -> None:
    """Raise one line when the measured bytes exceed the budget (the export is then discarded)."""
    from stcompress.errors import ModelError

    budget = parse_size(cfg.size_budget)
    keys = ("safetensors", "torch_save") if cfg.budget_measure == "both" else (cfg.budget_measure,)
    over = {k: measured[k] for k in keys if measured[k] > budget}
    if over:
        shown = ", ".join(f"{k} {v:,} bytes ({show_size(v)})" for k, v in over.items())
        raise ModelError(f"size_budget: {cfg.size_budget} ({budget:,} bytes) exceeded: measured {shown}; the export was "
                         "discarded; raise the budget, or fix smaller bits (--bits) or more removed layers (--num-layers)")
