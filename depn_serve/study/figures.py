"""The studies' figures (PNG, written atomically next to the study's JSON)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from depn_serve.evaluation.figures import save_figure  # noqa: E402

TARGET, OTHERS, COST = "#c0392b", "#2471a3", "#7f8c8d"


def plot_methods(runs: list[dict], tenant: str, path: Path) -> None:
    """Per method: change of the target's exposure, the others' exposure and perplexity (%)."""
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(runs) + 2), 3.8))
    width = 0.27
    for i, run in enumerate(runs):
        values = [run["target"]["exposure_change_pct"], run["others"]["exposure_change_pct"], run["ppl_change_pct"]]
        for j, (value, color) in enumerate(zip(values, (TARGET, OTHERS, COST))):
            ax.bar(i + (j - 1) * width, value or 0.0, width, color=color)
    ax.axhline(0, color="black", lw=0.6)
    ax.axhline(-70, color=TARGET, lw=0.8, ls=":")
    ax.set_xticks(range(len(runs)))
    ax.set_xticklabels([f"{r['label']}\n{r['neurons']} neurons" for r in runs], fontsize=8)
    ax.set_ylabel("change vs. unedited model (%)")
    ax.set_title(f"{tenant}: exposure of its secrets (red), of other tenants' (blue), perplexity (grey)")
    save_figure(fig, path)


def plot_batch_size(runs: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    n = [r["records"] for r in runs]
    ax.plot(n, [r["target"]["exposure_change_pct"] for r in runs], "o-", color=TARGET, label="edited records' exposure")
    ax.plot(n, [r["ppl_change_pct"] for r in runs], "s-", color=COST, label="validation perplexity")
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xlabel("records in the edit")
    ax.set_ylabel("change (%)")
    ax.legend(fontsize=8)
    ax.set_title("edit batch size")
    save_figure(fig, path)


def plot_prompts(carriers: list[dict], tenant: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7.5, 0.38 * len(carriers) + 1.2))
    labels = [f"{'[held out] ' if c['held_out'] else ''}{c['carrier']}" for c in carriers]
    y = range(len(carriers))
    ax.barh([i + 0.2 for i in y], [c["exposure_before"] for c in carriers], 0.4, color=COST, label="before")
    ax.barh([i - 0.2 for i in y], [c["exposure_after"] for c in carriers], 0.4, color=TARGET, label="after")
    ax.set_yticks(list(y))
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("mean exposure (bits)")
    ax.set_title(f"{tenant}: exposure per carrier sentence")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_frequency(points: list[dict], tenant: str, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for ax, key in zip(axes, ("before", "after")):
        for target, color, label in ((True, TARGET, tenant), (False, OTHERS, "other tenants")):
            pts = [(p["repeats"], p[key]) for p in points if (p["tenant"] == tenant) == target]
            if pts:
                ax.scatter(*zip(*pts), s=16, color=color, alpha=0.8, label=label)
        ax.set_xlabel("times the record appears in training")
        ax.set_title(f"{key} the edit")
    axes[0].set_ylabel("exposure (bits)")
    axes[0].legend(fontsize=8)
    save_figure(fig, path)


def plot_neuron_layers(rows: dict[str, list[int]], path: Path) -> None:
    """One line per selection: share of its neurons in each layer."""
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for label, counts in rows.items():
        total = sum(counts) or 1
        ax.plot(range(len(counts)), [100 * c / total for c in counts], "o-", label=label, lw=1)
    ax.set_xlabel("layer")
    ax.set_ylabel("% of the selection's neurons")
    ax.legend(fontsize=6, ncol=2)
    ax.set_title("privacy neurons per layer")
    save_figure(fig, path)


def plot_model_size(sizes: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.6))
    x = range(len(sizes))
    ax.bar([i - 0.2 for i in x], [s["target"]["exposure_before"] for s in sizes], 0.4, color=COST, label="before")
    ax.bar([i + 0.2 for i in x], [s["target"]["exposure_after"] for s in sizes], 0.4, color=TARGET, label="after")
    ax.set_xticks(list(x))
    ax.set_xticklabels([f"{s['size']}\n{s['params'] / 1e6:.1f} M, {s['neurons']} neurons" for s in sizes], fontsize=8)
    ax.set_ylabel("mean exposure (bits)")
    ax.legend(fontsize=8)
    ax.set_title("model size")
    save_figure(fig, path)


def plot_training(checkpoints: list[dict], tenant: str, path: Path) -> None:
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 3.8))
    fig.subplots_adjust(wspace=0.5)  # room for the left plot's second axis
    steps = [c["step"] for c in checkpoints]
    ax.plot(steps, [c["exposure"] for c in checkpoints], "o-", color=TARGET, label=f"{tenant} exposure (bits)")
    ax.set_xlabel("training step")
    ax.set_ylabel("mean exposure (bits)")
    twin = ax.twinx()
    twin.plot(steps, [c["all_extraction"] for c in checkpoints], "s--", color=COST, label="greedy extraction")
    twin.set_ylabel("greedy extraction (all records)")
    ax.set_title("memorization during training")
    layers = len(checkpoints[0]["vote_layers"])
    bottom = [0.0] * len(checkpoints)
    cmap = plt.get_cmap("viridis", layers)
    for layer in range(layers):
        share = [100 * c["vote_layers"][layer] / max(sum(c["vote_layers"]), 1) for c in checkpoints]
        bx.bar([str(s) for s in steps], share, bottom=bottom, color=cmap(layer), label=f"L{layer}")
        bottom = [b + s for b, s in zip(bottom, share)]
    bx.set_xlabel("training step")
    bx.set_ylabel("% of DEPN's neurons")
    bx.legend(fontsize=7, ncol=2)
    bx.set_title("where the privacy neurons are")
    save_figure(fig, path)
