"""Plots people would rather look at than tables: loss curves and expert utilization (matplotlib, no display)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: works on headless machines
import matplotlib.pyplot as plt
import numpy as np


def loss_curves(runs: dict[str, list[dict]], path: str | Path) -> Path:
    """Training loss (thin) and validation loss (markers) against tokens seen, one color per run."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (name, rows), color in zip(runs.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False):
        train = [r for r in rows if r["split"] == "train"]
        val = [r for r in rows if r["split"] == "val"]
        tokens_per_step = train[0]["tokens"] / train[0]["step"] if train else 1
        ax.plot([r["tokens"] for r in train], [r["loss"] for r in train], color=color, alpha=0.5, lw=1)
        ax.plot([r["step"] * tokens_per_step for r in val], [r["val_loss"] for r in val], "o-", color=color, label=name)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("training (thin) and validation (markers) loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def expert_utilization(loads: list[np.ndarray], path: str | Path, title: str) -> Path:
    """Heatmap of each layer's share of routed assignments per expert; uniform is 1/E everywhere."""
    share = np.stack([load / max(load.sum(), 1) for load in loads])  # (L, E)
    n_experts = share.shape[1]
    fig, ax = plt.subplots(figsize=(max(6, n_experts * 0.15), 1.2 + 0.5 * len(loads)))
    im = ax.imshow(share * n_experts, aspect="auto", cmap="viridis", vmin=0)
    ax.set_xlabel("routed expert")
    ax.set_ylabel("layer")
    ax.set_yticks(range(len(loads)))
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="load / uniform load")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
