"""Figures people would rather look at than read."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from depn_serve.fileio import atomic_write_bytes  # noqa: E402
from depn_serve.masks import NeuronMask  # noqa: E402


def _save(fig, path: Path) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format=Path(path).suffix.lstrip(".") or "png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())


def plot_mask_layers(mask: NeuronMask, path: Path) -> None:
    """Bar chart: switched-off neurons per layer (share of the layer on a second axis)."""
    m = mask.manifest
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * m.num_layers + 2), 3))
    ax.bar(range(m.num_layers), m.neurons_per_layer, color="#c0392b")
    ax.set_xlabel("layer")
    ax.set_ylabel("masked neurons")
    ax.set_xticks(range(m.num_layers))
    ax.set_title(f"tenant {m.tenant}: {m.neuron_count} privacy neurons")
    share = ax.secondary_yaxis("right", functions=(lambda n: 100 * n / m.intermediate_size,
                                                   lambda p: p * m.intermediate_size / 100))
    share.set_ylabel("% of layer")
    _save(fig, path)
