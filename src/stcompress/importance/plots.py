"""The importance heatmap: selection score of removing each layer, round by round."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from stcompress.artifacts import atomic_write_bytes
from stcompress.importance.state import Record


def score_matrix(records: Sequence[Record], metric: str, n_layers: int, rounds: int) -> np.ndarray:
    """rounds x layers of full-dev-set scores; NaN where a layer was not evaluated in a round."""
    grid = np.full((rounds, n_layers), np.nan)
    for r in records:
        if r.layer is not None and not r.approximate and 1 <= r.round <= rounds:
            grid[r.round - 1, r.layer] = r.scores[metric]
    return grid


def heatmap(records: Sequence[Record], metric: str, n_layers: int, removal_order: Sequence[int], path: Path,
            *, baseline: float | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = max([len(removal_order)] + [r.round for r in records if r.layer is not None and not r.approximate] + [1])
    grid = score_matrix(records, metric, n_layers, rounds)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.32 * n_layers + 2), max(2.5, 0.45 * rounds + 1.5)))
    image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="viridis", interpolation="nearest")
    for round_index, layer in enumerate(removal_order):
        ax.scatter(layer, round_index, marker="x", color="red", s=40)
    ax.set_xlabel("decoder layer removed (original index)")
    ax.set_ylabel("round")
    ax.set_xticks(range(n_layers))
    ax.set_xticklabels([str(i) for i in range(n_layers)], fontsize=7)
    ax.set_yticks(range(rounds))
    ax.set_yticklabels([str(i + 1) for i in range(rounds)])
    title = f"{metric} after removing each layer (x = removed that round)"
    if baseline is not None:
        title += f"; unpruned {baseline:.1f}"
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label=metric)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())  # a full disk leaves no temp file and no torn PNG
    return path
