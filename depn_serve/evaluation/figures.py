"""Figures people would rather look at than read."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from depn_serve.artifacts.mask import NeuronMask  # noqa: E402
from depn_serve.core.fileio import atomic_write_bytes  # noqa: E402
from depn_serve.evaluation.matrix import IsolationMatrix  # noqa: E402
from depn_serve.evaluation.report import EvalReport  # noqa: E402


def save_figure(fig, path: Path) -> None:
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
    save_figure(fig, path)


def plot_exposure(report: EvalReport, path: Path) -> None:
    """Per digit record: exposure before (x) vs after (y), for the mask and the random baseline."""
    before = {r.id: r for r in report.states[0].records if r.exposure is not None}
    edited = report.states[1:]
    fig, axes = plt.subplots(1, len(edited), figsize=(4.2 * len(edited), 4), squeeze=False)
    top = max((r.exposure for r in before.values()), default=1.0) * 1.05
    for ax, state in zip(axes[0], edited):
        for target, color, label in ((True, "#c0392b", f"{report.target_tenant} (target)"), (False, "#2471a3", "others")):
            pts = [(before[r.id].exposure, r.exposure) for r in state.records
                   if r.id in before and (r.tenant == report.target_tenant) == target]
            if pts:
                ax.scatter(*zip(*pts), s=18, color=color, label=label, alpha=0.8)
        ax.plot([0, top], [0, top], color="grey", lw=0.8, ls="--")
        ax.set_xlim(0, top)
        ax.set_ylim(0, top)
        ax.set_xlabel("exposure before (bits)")
        ax.set_ylabel(f"exposure after: {state.name} (bits)")
        ax.set_title(f"{state.name}: {state.neurons} neurons, PPL {state.valid_ppl:.2f}")
        ax.legend(loc="upper left", fontsize=8)
    save_figure(fig, path)


def plot_matrix(matrix: IsolationMatrix, path: Path) -> None:
    """Heatmaps of the cross-tenant matrix (greedy and sampled extraction): rows request, columns own."""
    panels = [("greedy extraction", "shown")]
    if any(c.sampled is not None for c in matrix.cells):
        panels.append((f"sampled ({matrix.settings.samples} at T = {matrix.settings.temperature:g})", "sampled"))
    rows, cols = matrix.requesters, matrix.owners
    fig, axes = plt.subplots(1, len(panels), figsize=(2.2 + 1.3 * len(cols) * len(panels), 1.2 + 0.6 * len(rows)),
                             squeeze=False)
    for ax, (title, attr) in zip(axes[0], panels):
        values = [[getattr(matrix.cell(r, c), attr) or 0.0 for c in cols] for r in rows]
        ax.imshow(values, cmap="Reds", vmin=0, vmax=1)
        for i, row in enumerate(values):
            for j, value in enumerate(row):
                ax.text(j, i, f"{100 * value:.0f} %", ha="center", va="center",
                        color="white" if value > 0.5 else "black")
        ax.set_xticks(range(len(cols)), cols)
        ax.set_yticks(range(len(rows)), rows)
        ax.set_xlabel("whose records")
        ax.set_ylabel("requesting key")
        ax.set_title(title)
    fig.suptitle(f"cross-tenant extraction ({matrix.path})", y=1.04)
    save_figure(fig, path)
