"""Figures for a reproduced table: validation-loss curves, expert-load CV over training, and the
table's own trade-off (compression vs perplexity for table4, improvement vs size for table7)."""

from __future__ import annotations

from pathlib import Path

from moemla.plots import plt
from moemla.runs import RunFolder

Row = dict[str, object]
COLORS = plt.rcParams["axes.prop_cycle"].by_key()["color"]


def _by_name(runs: list[Row]) -> dict[str, list[list[dict]]]:
    """Each table row's metrics, one list per seed."""
    out: dict[str, list[list[dict]]] = {}
    for r in runs:
        out.setdefault(str(r["name"]), []).append(RunFolder(str(r["run"])).metrics())
    return out


def val_loss_curves(runs: list[Row], path: Path, title: str) -> Path:
    """Validation loss against training tokens, one color per table row, one line per seed."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, (name, seeds) in enumerate(_by_name(runs).items()):
        for j, metrics in enumerate(seeds):
            val = [m for m in metrics if m["split"] == "val"]
            train = [m for m in metrics if m["split"] == "train"]
            per_step = train[0]["tokens"] / train[0]["step"] if train else 1
            ax.plot(
                [m["step"] * per_step for m in val], [m["val_loss"] for m in val], "o-", ms=3,
                color=COLORS[i % len(COLORS)], label=name if j == 0 else None, alpha=0.9 if j == 0 else 0.5,
            )  # fmt: skip
    return _finish(fig, ax, "training tokens", "validation loss (nats/token)", title, path)


def load_cv_curves(runs: list[Row], path: Path, title: str) -> Path | None:
    """The largest per-layer expert-load CV of each MoE run over training; the paper's bound is 0.1."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    drawn = False
    for i, (name, seeds) in enumerate(_by_name(runs).items()):
        for j, metrics in enumerate(seeds):
            train = [m for m in metrics if m["split"] == "train" and m.get("load_cv")]
            if train and any(max(m["load_cv"]) > 0 for m in train):  # all experts active (coarse): CV is 0
                drawn = True
                ax.plot(
                    [m["step"] for m in train], [max(m["load_cv"]) for m in train],
                    color=COLORS[i % len(COLORS)], label=name if j == 0 else None, lw=1,
                )  # fmt: skip
    if not drawn:
        plt.close(fig)
        return None
    ax.axhline(0.1, color="k", ls="--", lw=1, label="paper: CV < 0.1")
    return _finish(fig, ax, "optimizer step", "max over layers of expert-load CV (training batches)", title, path)


def compression_tradeoff(summary: list[Row], full: Row, paper: dict[str, tuple[float, float]], path: Path) -> Path:
    """Table 4: perplexity relative to the 1:1 row `full` against KV-cache saving, ours beside the paper's."""
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ours_x = [1 - r["kv_cache_bytes_per_token"] / full["kv_cache_bytes_per_token"] for r in summary]  # type: ignore[operator]
    ours_y = [r["val_ppl_mean"] / full["val_ppl_mean"] - 1 for r in summary]  # type: ignore[operator]
    ax.plot(ours_x, ours_y, "o-", label="ours")
    ax.plot([p[1] for p in paper.values()], [p[0] / paper["1:1"][0] - 1 for p in paper.values()], "s--", label="paper")
    for r, x, y in zip(summary, ours_x, ours_y, strict=True):
        ax.annotate(str(r["name"]), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("KV-cache saving vs 1:1")
    ax.set_ylabel("validation perplexity vs 1:1")
    ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:.0%}"))
    ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:+.0%}"))
    ax.set_title("compression trade-off (Table 4)")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def scaling(points: list[tuple[str, float, float, float]], paper: dict[str, tuple], path: Path) -> Path:
    """Table 7: relative perplexity change of MoE-MLA-RoPE vs MHA against total parameters, with 95% CIs."""
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.errorbar([p[1] for p in points], [p[2] for p in points], yerr=[p[3] for p in points], fmt="o-", label="ours")
    for name, x, y, _ in points:
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.errorbar(
        [v[0] * 1e6 for v in paper.values()], [v[3] for v in paper.values()], yerr=[v[4] for v in paper.values()],
        fmt="s--", label="paper",
    )  # fmt: skip
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("total parameters of the MHA model")
    ax.set_ylabel("MoE-MLA-RoPE perplexity vs MHA")
    ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:+.0%}"))
    ax.set_title("scaling (Table 7)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return _save(fig, path)


def _finish(fig: plt.Figure, ax: plt.Axes, xlabel: str, ylabel: str, title: str, path: Path) -> Path:
    """Log-scale y (losses and CVs span decades early in training), labels, grid, legend; then save."""
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, ncol=2)
    return _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
