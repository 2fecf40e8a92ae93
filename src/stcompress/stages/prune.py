"""`stcompress prune`: physically remove layers and save a model plain transformers can load.

The layers come from a list, or from the first K of an importance run's removal order. The output
directory is itself a model directory (safetensors, config, generation config, processor, chat
template) plus manifest.json with the layer map (new index -> original index). Before the output
is marked complete it is reloaded from disk and must decode a few segments exactly like the
in-memory pruned model.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

from stcompress.artifacts import MANIFEST, atomic_write_json, build_manifest, path_identity, read_manifest, staged_output
from stcompress.config import PruneConfig, to_dict
from stcompress.data.sources import load_examples
from stcompress.errors import StcompressError
from stcompress.metrics.efficiency import weight_bytes
from stcompress.model import arch
from stcompress.model.layers import check_layers, remove_decoder_layers, remove_encoder_layers
from stcompress.model.load import load_model
from stcompress.model.save import reload_check, save_model
from stcompress.outputs import claims_output
from stcompress.stages.translate import model_info

log = logging.getLogger(__name__)


def layers_to_remove(cfg: PruneConfig) -> tuple[list[int], dict[str, Any]]:
    """The decoder layers to drop, and where that choice came from."""
    if cfg.layers and cfg.importance:
        raise StcompressError("prune: give either layers or importance, not both")
    if cfg.importance:
        manifest = read_manifest(cfg.importance)
        if manifest.get("stage") != "importance":
            raise StcompressError(f"importance: {cfg.importance} is a {manifest.get('stage')} output, not an importance search")
        if manifest["config"].get("component", "decoder") != "decoder":
            raise StcompressError(f"importance: {cfg.importance} ranked audio-encoder layers; pass them as encoder_layers")
        order = list(manifest["removal_order"])
        k = len(order) if cfg.num_layers is None else cfg.num_layers
        if not 0 < k <= len(order):
            raise StcompressError(f"num_layers: {k} is not between 1 and the {len(order)} layers the search ranked; pick one in that range")
        return order[:k], {"importance": path_identity(Path(cfg.importance) / MANIFEST), "removal_order": order, "num_layers": k}
    if not cfg.layers and not cfg.encoder_layers:
        raise StcompressError("prune: nothing to remove; give layers (e.g. --layers 1,3,9) or importance (an importance output dir)")
    return list(cfg.layers), {}


def recorded_model(importance: str | Path) -> tuple[str, dict[str, Any]]:
    """The model an importance search ranked, usable from any working directory: the resolved path
    its manifest's inputs record; for older manifests (a relative config path only), that path
    resolved against the working directory, else against the folders above the manifest."""
    manifest = read_manifest(importance)
    identity = (manifest.get("inputs") or {}).get("model") or {}
    recorded = identity.get("path") or manifest["config"]["model"]["path"]
    path = Path(recorded).expanduser()
    if identity.get("name") or path.is_absolute() or path.exists():
        return identity.get("name") or recorded, identity
    for base in Path(importance).resolve().parents:
        if (base / path).exists():
            return str(base / path), identity
    return recorded, identity


def _model_path(cfg: PruneConfig) -> tuple[PruneConfig, dict[str, Any]]:
    """Default the model to the one the importance search ranked (and the identity it recorded)."""
    if cfg.importance and not cfg.model.path:
        path, identity = recorded_model(cfg.importance)
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=path)), identity
    return cfg, {}


@claims_output()
def run(cfg: PruneConfig, *, progress: bool = True) -> Path:
    t0 = time.perf_counter()
    cfg, ranked = _model_path(cfg)
    remove, source = layers_to_remove(cfg)
    loaded = load_model(cfg.model)
    model_identity = path_identity(loaded.path)
    if ranked.get("sha256") and model_identity.get("sha256") not in (None, ranked["sha256"]):
        log.warning("model: %s differs from the model the importance search ranked (content hash changed since); "
                    "its removal order may not fit", loaded.path)
    n_before = arch.num_decoder_layers(loaded.model)
    remove = check_layers(remove, n_before, item="layers")
    before = model_info(loaded)
    layer_map = remove_decoder_layers(loaded.model, remove) if remove else list(range(n_before))
    encoder_map = remove_encoder_layers(loaded.model, cfg.encoder_layers) if cfg.encoder_layers else None
    check = load_examples(dataclasses.replace(cfg.data, limit=cfg.check_segments), on_error="skip").examples
    if not check:
        raise StcompressError("data: no segments for the reload check; point data at a dataset with audio")
    with staged_output(cfg.output) as out:
        save_model(loaded.model, loaded.processor, out)
        verified = reload_check(loaded.model, loaded.processor, out, check, max_new_tokens=cfg.check_max_new_tokens,
                                generation=cfg.generation)
        after = model_info(loaded) | {"path": str(Path(cfg.output).resolve()), "bytes_on_disk": weight_bytes(out)}
        manifest = build_manifest(
            "prune", to_dict(cfg), {"model": model_identity, **source}, {"total": time.perf_counter() - t0},
            removed_layers=sorted(remove), layer_map=layer_map, encoder_layer_map=encoder_map,
            base_model=loaded.path, model_before=before, model=after, reload_check=verified,
        )
        atomic_write_json(out / MANIFEST, manifest)
    log.info("removed decoder layers %s: %d -> %d layers, %s -> %s parameters", sorted(remove), n_before,
             len(layer_map), f"{before['parameters']:,}", f"{after['parameters']:,}")
    return Path(cfg.output)
