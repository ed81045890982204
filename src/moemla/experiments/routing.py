"""§7 open question 3, dynamic expert selection, as a table: fixed top-k routing against top-p routing."""

from __future__ import annotations

import numpy as np

from moemla import accounting
from moemla.config import ModelConfig
from moemla.experiments.rows import SEQ_LEN, Row, base_row, bpb_cell, paired_p_value, ppl_cell, versus
from moemla.experiments.sweep import RunSpec

ROUTING = {"top-2": 2, "top-4": 4, "top-6": 6, "top-8": 8, "top-p=0.5": 0.5, "top-p=0.7": 0.7, "top-p=0.9": 0.9}


def routing_specs(bases: dict[str, ModelConfig], seeds: list[int]) -> list[RunSpec]:
    """§7 question 3, dynamic expert selection: MoE-MLA-RoPE with top-k routing for k = 2, 4, 6, 8 and with top-p
    routing (up to 8 experts, at least 1) for three p; the same experts and parameters in every row."""
    (base,) = bases.values()
    moe = base.replace(attention="mla", positions="rope", ffn="moe", rope_mode="post")
    specs = []
    for name, value in ROUTING.items():
        if isinstance(value, int):
            cfg = moe.replace(n_activated_experts=value, min_activated_experts=1)
        else:
            cfg = moe.replace(routing="top-p", routing_p=value, n_activated_experts=8, min_activated_experts=1)
        one = accounting.flops_per_token_at(cfg, 1, SEQ_LEN)
        labels = {"max_experts": cfg.n_activated_experts, "flops_one": one,
                  "flops_per_expert": accounting.flops_per_token_at(cfg, 2, SEQ_LEN) - one}  # fmt: skip
        specs += [RunSpec(name, cfg, s, labels) for s in seeds]
    return specs


def routing_markdown(rows: list[Row]) -> str:
    """Quality against the routed experts a token actually got (measured on validation text) and their FLOPs; a
    top-p row beats fixed routing when its perplexity is below the top-k curve at its mean (EXPERIMENTS.md). With
    2+ seeds the last column tests that paired by seed: each seed's top-p run against its own seed's curve."""
    base = base_row(rows, "top-6")
    fixed = [r for r in rows if not str(r["name"]).startswith("top-p") and r.get("active_experts_mean") is not None]
    lines = [
        "| routing | most experts | mean routed experts (measured) | forward GFLOPs/token | val PPL | bits/byte "
        "| vs top-6 | p (paired t) | top-k curve at that mean | below the curve | p vs the curve (paired t) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        active = r.get("active_experts_mean")
        flops = "-" if active is None else f"{(r['flops_one'] + (active - 1) * r['flops_per_expert']) / 1e9:.4f}"  # type: ignore[operator]
        rel, p = versus(r, base)
        shown, at, below, p_curve = "-" if active is None else f"{active:.2f}", "-", "-", "-"
        if str(r["name"]).startswith("top-p") and active is not None and len(fixed) > 1:
            level = _curve_at([(float(f["active_experts_mean"]), float(f["val_ppl_mean"])) for f in fixed], active)  # type: ignore[arg-type]
            at, below = f"{level:.3f}", "yes" if r["val_ppl_mean"] < level else "no"  # type: ignore[operator]
            p_curve = _p_against_curve(r, fixed)
        lines.append(
            f"| {r['name']} | {r['max_experts']} | {shown} | {flops} | {ppl_cell(r)} | {bpb_cell(r)} | {rel} | {p} "
            f"| {at} | {below} | {p_curve} |"
        )
    return "\n".join(lines) + f"\n\nFLOPs at context {SEQ_LEN}, with the measured mean number of routed experts."


def _curve_at(points: list[tuple[float, float]], x: float) -> float:
    """The top-k curve, (routed experts, perplexity) points, interpolated linearly at x."""
    ks, ppls = zip(*sorted(points), strict=True)
    return float(np.interp(x, ks, ppls))


def _p_against_curve(row: Row, fixed: list[Row]) -> str:
    """Paired t-test of a top-p row's perplexities against the top-k curve of the same seed at its own measured
    mean; "-" with one seed or where a seed's run lacks the measured mean (runs from before it was measured)."""
    seeds = len(row["val_ppl_by_seed"])  # type: ignore[arg-type]
    by_seed = [(r.get("active_experts_by_seed") or [None], r["val_ppl_by_seed"]) for r in [row, *fixed]]
    if seeds < 2 or any(len(a) != seeds or len(v) != seeds or None in a for a, v in by_seed):  # type: ignore[arg-type,operator]
        return "-"
    (active, ppls), curves = by_seed[0], by_seed[1:]
    level = [_curve_at([(float(a[i]), float(v[i])) for a, v in curves], float(active[i])) for i in range(seeds)]  # type: ignore[index]
    p = paired_p_value([float(v) for v in ppls], level)  # type: ignore[attr-defined]
    return "-" if p is None else f"{p:.3g}"
