"""The paper's ablation tables as run lists, and their Markdown reports beside the paper's numbers."""

from __future__ import annotations

from moemla.config import VARIANTS, ModelConfig
from moemla.experiments.matching import match
from moemla.experiments.sweep import RunSpec

# Table 4 (9L-512d MoE-MLA-RoPE): compression -> (validation perplexity, memory saving)
PAPER_TABLE4 = {"1:1": (7.347, 0.0), "2:1": (7.388, 0.50), "4:1": (7.916, 0.75), "8:1": (8.893, 0.875)}
# Table 5: design -> (total experts, validation perplexity, load CV)
PAPER_TABLE5 = {"coarse": (8, 8.234, 0.00), "standard": (16, 7.812, 0.08), "fine": (64, 7.388, 0.06)}
# Table 2 (53.9M parameters): variant -> validation perplexity; other variants are our additions
PAPER_TABLE2 = {
    "mha": 8.542,
    "mla": 8.971,
    "mla-rope": 8.579,
    "moe-mha": 8.092,
    "moe-mla": 7.741,
    "moe-mla-rope": 7.388,
}
COMPRESSIONS = {"1:1": 1.0, "2:1": 0.5, "4:1": 0.25, "8:1": 0.125}


def table2_specs(base: ModelConfig, seeds: list[int]) -> list[RunSpec]:
    """Every variant, parameter-matched (within 2%, by search) to the dense MHA of the same size."""
    reference = base.replace(attention="mha", positions="learned", ffn="dense", rope_mode="post")
    specs = []
    for name, choices in VARIANTS.items():
        m = match(reference, base.replace(**{"rope_mode": "post", **choices}), "params")
        labels = {
            "matched_ratio": m.ratio,
            "dim": m.cfg.dim,
            "ffn_width": m.cfg.dense_inter_dim if m.cfg.ffn == "dense" else m.cfg.expert_inter_dim,
        }
        specs += [RunSpec(name, m.cfg, s, labels) for s in seeds]
    return specs


def paired_p_value(a: list[float], b: list[float]) -> float | None:
    """Two-sided paired t-test over seeds (scipy); None with fewer than 2 pairs or without scipy."""
    if len(a) < 2 or len(a) != len(b):
        return None
    try:
        from scipy.stats import ttest_rel
    except ImportError:
        return None
    return float(ttest_rel(a, b).pvalue)


def table2_markdown(rows: list[dict[str, object]]) -> str:
    base = next(r for r in rows if r["name"] == "mha")
    lines = [
        "| variant | d | FFN/expert width | params (vs mha) | active params | val PPL (ours) | vs mha | p (paired t) "
        "| val PPL (paper) | vs mha (paper) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        name = str(r["name"])
        p = paired_p_value(r["val_ppl_by_seed"], base["val_ppl_by_seed"]) if name != "mha" else None  # type: ignore[arg-type]
        rel = r["val_ppl_mean"] / base["val_ppl_mean"] - 1  # type: ignore[operator]
        paper = PAPER_TABLE2.get(name)
        paper_cols = f"{paper} | {paper / PAPER_TABLE2['mha'] - 1:+.1%}" if paper else "(our addition) | -"
        lines.append(
            f"| {name} | {r['dim']} | {r['ffn_width']} | {r['total_params'] / 1e6:.2f}M ({r['matched_ratio']:.3f}) "
            f"| {r['active_params'] / 1e6:.2f}M | {_ppl(r)} | {rel:+.1%} | {'-' if p is None else f'{p:.3g}'} "
            f"| {paper_cols} |"
        )
    return "\n".join(lines)


def table4_specs(base: ModelConfig, seeds: list[int]) -> list[RunSpec]:
    """MoE-MLA-RoPE at latent rank r = d, d/2, d/4, d/8."""
    specs = []
    for name, rho in COMPRESSIONS.items():
        cfg = base.replace(attention="mla", positions="rope", ffn="moe", kv_compression=rho)
        specs += [RunSpec(name, cfg, s, {"latent_dim": cfg.kv_lora_rank}) for s in seeds]
    return specs


def table5_specs(base: ModelConfig, seeds: list[int]) -> list[RunSpec]:
    """8 active experts (2 shared + top-6) out of 8, 16 or 64; total expert parameters held constant.

    The paper does not say how wide its coarse experts are. Splitting the same capacity into more,
    smaller experts is what granularity means in DeepSeekMoE, so the width scales as 64 / total.
    """
    fine = base.replace(attention="mla", positions="rope", ffn="moe", n_shared_experts=2, n_activated_experts=6)
    specs = []
    for name, (total, _, _) in PAPER_TABLE5.items():
        width = fine.expert_inter_dim * 64 // total
        cfg = fine.replace(n_routed_experts=total - 2, moe_inter_dim=width)
        specs += [RunSpec(name, cfg, s, {"total_experts": total, "expert_width": width}) for s in seeds]
    return specs


def _ppl(row: dict[str, object]) -> str:
    if row["seeds"] == 1:
        return f"{row['val_ppl_mean']:.3f} (1 seed)"
    return f"{row['val_ppl_mean']:.3f} ± {row['val_ppl_std']:.3f}"


def table4_markdown(rows: list[dict[str, object]]) -> str:
    full = next(r for r in rows if r["name"] == "1:1")["kv_cache_bytes_per_token"]
    lines = [
        "| compression | latent dim r | val PPL (ours) | val PPL (paper) | KV saving (ours) | KV saving (paper) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        ppl, saving = PAPER_TABLE4[str(r["name"])]
        ours = 1 - r["kv_cache_bytes_per_token"] / full  # type: ignore[operator]
        lines.append(f"| {r['name']} | {r['latent_dim']} | {_ppl(r)} | {ppl} | {ours:.1%} | {saving:.1%} |")
    best = min(rows, key=lambda r: r["val_ppl_mean"])  # type: ignore[arg-type, return-value]
    lines.append(f"\nLowest perplexity here: {best['name']} (the paper names 2:1 the sweet spot; 1:1 is its lowest).")
    return "\n".join(lines)


def table5_markdown(rows: list[dict[str, object]]) -> str:
    lines = [
        "| design | total experts | expert width | val PPL (ours) | val PPL (paper) | load CV (ours) "
        "| load CV (paper) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        _, ppl, cv = PAPER_TABLE5[str(r["name"])]
        ours_cv = f"{r['max_load_cv']:.3f}" if r["max_load_cv"] is not None else "-"
        lines.append(
            f"| {r['name']} | {r['total_experts']} | {r['expert_width']} | {_ppl(r)} | {ppl} | {ours_cv} | {cv:.2f} |"
        )
    return "\n".join(lines)


def params_note(rows: list[dict[str, object]]) -> str:
    return "Parameters per row: " + ", ".join(
        f"{r['name']} {r['total_params'] / 1e6:.2f}M total / {r['active_params'] / 1e6:.2f}M active" for r in rows
    )


TABLES = {
    "table2": (table2_specs, table2_markdown),
    "table4": (table4_specs, table4_markdown),
    "table5": (table5_specs, table5_markdown),
}
