"""Judge scores summarized: mean ± std and a 95% interval per model and dimension, split-half consistency,
paired differences between models, and the report beside the paper's Table 8."""

from __future__ import annotations

import math
import statistics
from itertools import combinations
from pathlib import Path

from moemla.eval.judge import DIMENSIONS, RUBRIC
from moemla.paper import JUDGE_SPLIT_HALF as PAPER_SPLIT_HALF
from moemla.paper import TABLE8 as PAPER_TABLE8

# scores[model][dimension][sample index] = score; samples share an index (same prompt, same seed) across models
Scores = dict[str, dict[str, dict[int, int]]]


def t_interval(values: list[float]) -> tuple[float, float] | None:
    """95% t-interval of the mean; None with fewer than two values."""
    if len(values) < 2:
        return None
    from scipy.stats import t

    mean, half = statistics.mean(values), t.ppf(0.975, len(values) - 1) * statistics.stdev(values)
    half /= math.sqrt(len(values))
    return mean - half, mean + half


def describe(values: list[float]) -> dict[str, object]:
    return {
        "n": len(values),
        "mean": statistics.mean(values) if values else None,
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "ci95": t_interval(values),
    }


def pearson(a: list[float], b: list[float]) -> float | None:
    if len(a) < 3 or statistics.pstdev(a) == 0 or statistics.pstdev(b) == 0:
        return None
    return statistics.correlation(a, b)


def split_half(scores: Scores) -> dict[str, object]:
    """Consistency of the judge across samples: every (model, dimension) mean taken over the even and over the
    odd samples, correlated across the cells (Pearson r), and the Spearman-Brown estimate for the full set."""
    even, odd = [], []
    for dims in scores.values():
        for by_sample in dims.values():
            e = [v for i, v in by_sample.items() if i % 2 == 0]
            o = [v for i, v in by_sample.items() if i % 2 == 1]
            if e and o:
                even.append(statistics.mean(e))
                odd.append(statistics.mean(o))
    r = pearson(even, odd)
    return {"r": r, "spearman_brown": 2 * r / (1 + r) if r is not None and r > -1 else None, "cells": len(even)}


def paired_differences(scores: Scores) -> list[dict[str, object]]:
    """For each pair of models and dimension: mean difference over the samples both have, 95% CI, paired t-test."""
    from scipy.stats import ttest_rel

    rows = []
    for a, b in combinations(scores, 2):
        for dim in DIMENSIONS:
            shared = sorted(set(scores[a][dim]) & set(scores[b][dim]))
            diff = [scores[a][dim][i] - scores[b][dim][i] for i in shared]
            p = None
            if len(diff) > 1 and statistics.pstdev(diff) > 0:
                p = float(ttest_rel([scores[a][dim][i] for i in shared], [scores[b][dim][i] for i in shared]).pvalue)
            rows.append({"a": a, "b": b, "dimension": dim, **describe(diff), "p": p})
    return rows


def summarize_scores(scores: Scores, unparsed: dict[str, int]) -> dict[str, object]:
    return {
        "models": {m: {d: describe(list(v.values())) for d, v in dims.items()} for m, dims in scores.items()},
        "unparsed": unparsed,
        "split_half": split_half(scores),
        "paired": paired_differences(scores),
    }


def _cell(stat: dict[str, object]) -> str:
    if stat["mean"] is None:
        return "-"
    text = f"{stat['mean']:.2f}"
    if stat["std"] is not None:
        text += f" ± {stat['std']:.2f}"
    if stat["ci95"] is not None:
        lo, hi = stat["ci95"]  # type: ignore[misc]
        text += f" [{lo:.2f}, {hi:.2f}]"
    return text


def scores_markdown(summary: dict[str, object], variants: dict[str, str]) -> str:
    """Ours (mean ± std [95% CI]) beside the paper's Table 8 for the variants it reports."""
    order = ("grammar", "creativity", "coherence", "overall")  # Table 8's column order
    models: dict = summary["models"]  # type: ignore[assignment]
    head = " | ".join(RUBRIC[d][0] for d in order)
    lines = [f"| model | variant | judged (unparsed) | {head} |", "| --- | --- | --- |" + " --- |" * len(order)]
    for name, dims in models.items():
        n = dims["overall"]["n"]
        lines.append(
            f"| {name} | {variants.get(name, '-')} | {n} ({summary['unparsed'][name]}) | "  # type: ignore[index]
            + " | ".join(_cell(dims[d]) for d in order)
            + " |"
        )
    for variant, paper in PAPER_TABLE8.items():
        cells = " | ".join(f"{paper[d][0]} ± {paper[d][1]}" for d in order)
        lines.append(f"| paper: {variant} | {variant} | 100 | {cells} |")
    return "\n".join(lines)


def paired_markdown(summary: dict[str, object]) -> str:
    rows: list = summary["paired"]  # type: ignore[assignment]
    if not rows:
        return "One model: no paired differences."
    lines = [
        "| a - b | dimension | samples | mean difference [95% CI] | p (paired t) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        ci = f" [{r['ci95'][0]:+.2f}, {r['ci95'][1]:+.2f}]" if r["ci95"] else ""
        mean = f"{r['mean']:+.2f}{ci}" if r["mean"] is not None else "-"
        p = f"{r['p']:.3g}" if r["p"] is not None else "-"
        lines.append(f"| {r['a']} - {r['b']} | {r['dimension']} | {r['n']} | {mean} | {p} |")
    return "\n".join(lines)


def split_half_text(summary: dict[str, object]) -> str:
    sh: dict = summary["split_half"]  # type: ignore[assignment]
    if sh["r"] is None:
        return f"Split-half correlation: not defined here ({sh['cells']} model x dimension cells, or no spread)."
    return (
        f"Split-half correlation (even vs odd samples, over {sh['cells']} model x dimension means): "
        f"r = {sh['r']:.2f}, Spearman-Brown {sh['spearman_brown']:.2f} (paper: r = {PAPER_SPLIT_HALF})."
    )


def bar_chart(summary: dict[str, object], variants: dict[str, str], path: Path) -> Path:
    """Mean score per dimension and model with 95% intervals; the paper's Table 8 as hollow markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models: dict = summary["models"]  # type: ignore[assignment]
    order = ("grammar", "creativity", "coherence", "overall")
    width = 0.8 / max(len(models), 1)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for j, (name, dims) in enumerate(models.items()):
        xs = [i + (j - (len(models) - 1) / 2) * width for i in range(len(order))]
        means = [dims[d]["mean"] or 0.0 for d in order]
        errs = [
            [m - dims[d]["ci95"][0] if dims[d]["ci95"] else 0 for m, d in zip(means, order, strict=True)],
            [dims[d]["ci95"][1] - m if dims[d]["ci95"] else 0 for m, d in zip(means, order, strict=True)],
        ]
        bars = ax.bar(xs, means, width, yerr=errs, capsize=3, label=name)
        paper = PAPER_TABLE8.get(variants.get(name, ""))
        if paper:
            ax.scatter(xs, [paper[d][0] for d in order], marker="_", s=300, color=bars[0].get_facecolor(), zorder=3)
    ax.set_xticks(range(len(order)), [RUBRIC[d][0] for d in order])
    ax.set_ylim(0, 10)
    ax.set_ylabel("judge score (1-10), mean and 95% CI")
    ax.set_title("Story quality by LLM judge (dashes: the paper's Table 8 for the same variant)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
