"""The paper's ablation tables as run lists, and their Markdown reports beside the paper's numbers."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from moemla.config import VARIANTS, ModelConfig
from moemla.experiments import figures
from moemla.experiments.matching import match, measure
from moemla.experiments.routing import routing_markdown, routing_specs
from moemla.experiments.rows import SEQ_LEN, Row, base_row, bpb_cell, ppl_cell, versus
from moemla.experiments.sweep import RunSpec
from moemla.paper import TABLE2 as PAPER_TABLE2
from moemla.paper import TABLE3 as PAPER_TABLE3
from moemla.paper import TABLE4 as PAPER_TABLE4
from moemla.paper import TABLE5 as PAPER_TABLE5
from moemla.paper import TABLE7 as PAPER_TABLE7
from moemla.paper import TABLE8 as PAPER_TABLE8

# the paper's numbers live in moemla.paper (one home); each Table below carries its own as `paper`
COMPRESSIONS = {"1:1": 1.0, "2:1": 0.5, "4:1": 0.25, "8:1": 0.125}


def _dense_mha(base: ModelConfig) -> ModelConfig:
    return base.replace(attention="mha", positions="learned", ffn="dense", rope_mode="post")


def _ffn_width(cfg: ModelConfig) -> int:
    """The width the matching search tunes: the MLP's for dense models, each expert's for MoE."""
    return cfg.dense_inter_dim if cfg.ffn == "dense" else cfg.expert_inter_dim


def table2_specs(bases: dict[str, ModelConfig], seeds: list[int]) -> list[RunSpec]:
    """Every variant, parameter-matched (within 2%, by search) to the dense MHA of the same size."""
    (base,) = bases.values()
    reference = _dense_mha(base)
    specs = []
    for name, choices in VARIANTS.items():
        m = match(reference, base.replace(**{"rope_mode": "post", **choices}), "params")
        labels = {
            "matched_ratio": m.ratio,
            "dim": m.cfg.dim,
            "ffn_width": _ffn_width(m.cfg),
        }
        specs += [RunSpec(name, m.cfg, s, labels) for s in seeds]
    return specs


def table2_markdown(rows: list[dict[str, object]]) -> str:
    base = base_row(rows, "mha")
    lines = [
        "| variant | d | FFN/expert width | params (vs mha) | active params | val PPL (ours) | bits/byte | vs mha "
        "| p (paired t) | val PPL (paper) | vs mha (paper) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        name = str(r["name"])
        rel, p = versus(r, base)
        paper = PAPER_TABLE2.get(name)
        paper_cols = f"{paper} | {paper / PAPER_TABLE2['mha'] - 1:+.1%}" if paper else "(our addition) | -"
        lines.append(
            f"| {name} | {r['dim']} | {r['ffn_width']} | {r['total_params'] / 1e6:.2f}M ({r['matched_ratio']:.3f}) "
            f"| {r['active_params'] / 1e6:.2f}M | {ppl_cell(r)} | {bpb_cell(r)} | {rel} | {p} "
            f"| {paper_cols} |"
        )
    return "\n".join(lines)


JUDGED = ("mha", "mla-rope", "moe-mha", "moe-mla-rope")  # Table 8's rows


def table8_specs(bases: dict[str, ModelConfig], seeds: list[int]) -> list[RunSpec]:
    """Table 8's four variants, parameter-matched to the dense MHA as in table2; their stories are judged."""
    return [s for s in table2_specs(bases, seeds) if s.name in JUDGED]


def table8_markdown(rows: list[Row]) -> str:
    """Judge scores (mean ± std; first seed's run) beside the paper's Table 8, with the judge-free statistics."""
    order = ("grammar", "creativity", "coherence", "overall")  # Table 8's column order
    lines = [
        "| variant | val PPL | bits/byte | grammar | creativity | coherence | overall | unparsed | distinct-2 "
        "| repeated 4-grams | paper: grammar / creativity / coherence / overall |",
        "| --- |" + " --- |" * 10,
    ]
    for r in rows:
        judge: dict | None = r.get("judge")  # type: ignore[assignment]
        cells = [f"{judge[d]['mean']:.2f} ± {judge[d]['std'] or 0:.2f}" if judge else "-" for d in order]
        stats: dict = r["sample_stats"]  # type: ignore[assignment]
        paper = " / ".join(f"{PAPER_TABLE8[str(r['name'])][d][0]}" for d in order)
        lines.append(
            f"| {r['name']} | {ppl_cell(r)} | {bpb_cell(r)} | {' | '.join(cells)} | {r.get('unparsed', '-')} "
            f"| {stats['distinct_2']:.3f} | {stats['repeated_4gram_rate']:.3f} | {paper} |"
        )
    if not any(r.get("judge") for r in rows):
        lines.append("\nNo judge scores: add `--endpoint URL --judge-model NAME` to score the stories.")
    return "\n".join(lines)


def table3_specs(bases: dict[str, ModelConfig], seeds: list[int]) -> list[RunSpec]:
    """The paper's four rows (plus decoupled RoPE and our control, dense MHA with RoPE, marked as ours): MoE rows
    match the dense MHA's forward FLOPs per token at the training context within 2%, by search; MLA-RoPE and
    MHA-RoPE keep MHA's shape as in the paper (their FLOPs ratio is reported, not matched)."""
    (base,) = bases.values()
    reference = _dense_mha(base)
    context = min(SEQ_LEN, base.max_seq_len)
    specs = []
    for name in ("mha", "mla-rope", "moe-mha", "moe-mla-rope", "moe-mla-drope", "mha-rope"):
        cfg = base.replace(**{"rope_mode": "post", **VARIANTS[name]})
        if cfg.ffn == "moe":
            cfg = match(reference, cfg, "flops", context=context).cfg
        elif name == "mha":
            cfg = reference
        labels = {
            "dim": cfg.dim,
            "ffn_width": _ffn_width(cfg),
            "flops_ratio": measure_ratio(cfg, reference, context),
        }
        specs += [RunSpec(name, cfg, s, labels) for s in seeds]
    return specs


def measure_ratio(cfg: ModelConfig, reference: ModelConfig, context: int) -> float:
    return measure(cfg, "flops", context) / measure(reference, "flops", context)


def table3_markdown(rows: list[Row]) -> str:
    base = base_row(rows, "mha")
    lines = [
        "| variant | d | FFN/expert width | params | active | FLOPs (vs mha) | val PPL (ours) | bits/byte | vs mha "
        "| p (paired t) | decode vs mha (ours) | val PPL (paper) | FLOPs (paper) | speedup (paper) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        name = str(r["name"])
        rel, p = versus(r, base)
        paper = PAPER_TABLE3.get(name)
        paper_cols = f"{paper[0]} | {paper[1]:.2f}x | {paper[2]:.1f}x" if paper else "(our addition) | - | -"
        speed = f"{r['decode_speedup_vs_mha']:.2f}x" if r.get("decode_speedup_vs_mha") is not None else "-"
        lines.append(
            f"| {name} | {r['dim']} | {r['ffn_width']} | {r['total_params'] / 1e6:.2f}M "
            f"| {r['active_params'] / 1e6:.2f}M "
            f"| {r['flops_ratio']:.3f}x | {ppl_cell(r)} | {bpb_cell(r)} | {rel} | {p} | {speed} "
            f"| {paper_cols} |"
        )
    return "\n".join(lines)


def table4_specs(bases: dict[str, ModelConfig], seeds: list[int]) -> list[RunSpec]:
    """MoE-MLA-RoPE at latent rank r = d, d/2, d/4, d/8."""
    (base,) = bases.values()
    specs = []
    for name, rho in COMPRESSIONS.items():
        cfg = base.replace(attention="mla", positions="rope", ffn="moe", kv_compression=rho)
        specs += [RunSpec(name, cfg, s, {"latent_dim": cfg.kv_lora_rank}) for s in seeds]
    return specs


def table5_specs(bases: dict[str, ModelConfig], seeds: list[int]) -> list[RunSpec]:
    """8 active experts (2 shared + top-6) out of 8, 16 or 64; total expert parameters held constant.

    The paper does not say how wide its coarse experts are. Splitting the same capacity into more,
    smaller experts is what granularity means in DeepSeekMoE, so the width scales as 64 / total.
    """
    (base,) = bases.values()
    fine = base.replace(attention="mla", positions="rope", ffn="moe", n_shared_experts=2, n_activated_experts=6)
    specs = []
    for name, (total, _, _) in PAPER_TABLE5.items():
        width = fine.expert_inter_dim * 64 // total
        # 64 experts is the preset's own shape: width left unset, so that row is Table 4's 2:1 run (--reuse)
        cfg = fine.replace(n_routed_experts=total - 2, moe_inter_dim=None if width == fine.expert_inter_dim else width)
        specs += [RunSpec(name, cfg, s, {"total_experts": total, "expert_width": width}) for s in seeds]
    return specs


def table7_specs(bases: dict[str, ModelConfig], seeds: list[int]) -> list[RunSpec]:
    """MHA and MoE-MLA-RoPE (parameter-matched, as table2) at every size preset given."""
    specs = []
    for preset, base in bases.items():
        reference = _dense_mha(base)
        moe = match(reference, base.replace(rope_mode="post", **VARIANTS["moe-mla-rope"]), "params").cfg
        for variant, cfg in (("mha", reference), ("moe-mla-rope", moe)):
            labels = {"preset": preset, "variant": variant}
            specs += [RunSpec(f"{preset}/{variant}", cfg, s, labels) for s in seeds]
    return specs


def relative_improvement(moe: Row, mha: Row) -> tuple[float, float, str]:
    """MoE-MLA-RoPE's perplexity relative to MHA's, and a 95% CI half-width.

    With 2+ seeds: a t-interval over the per-seed ratios (seed i of both runs share data order).
    With 1 seed only the validation-batch noise of both runs is known: a normal interval on the
    loss difference from each run's own CI, which understates the seed-to-seed spread.
    """
    a, b = list(moe["val_ppl_by_seed"]), list(mha["val_ppl_by_seed"])  # type: ignore[call-overload]
    rel = moe["val_ppl_mean"] / mha["val_ppl_mean"] - 1  # type: ignore[operator]
    if len(a) >= 2 and len(a) == len(b):
        from scipy.stats import t

        ratios = [x / y - 1 for x, y in zip(a, b, strict=True)]
        half = t.ppf(0.975, len(ratios) - 1) * statistics.stdev(ratios) / math.sqrt(len(ratios))
        return rel, half, f"t over {len(ratios)} seeds"
    if moe["val_ppl_ci95"] is None or mha["val_ppl_ci95"] is None:
        return rel, math.nan, "1 seed, 1 validation batch: no interval"
    se = [(math.log(r["val_ppl_ci95"][1]) - math.log(r["val_ppl_ci95"][0])) / (2 * 1.96) for r in (moe, mha)]  # type: ignore[index]
    return rel, 1.96 * math.hypot(*se) * (1 + rel), "1 seed: validation batches only"


def paired_sizes(rows: list[Row] | dict[str, Row]) -> list[tuple[str, Row, Row]]:
    """Table 7's sizes that trained both rows, as (preset, mha, moe-mla-rope), from the summary's rows or a mapping
    of "size/variant" to row: a size that a --rows split left with one row has nothing to compare, so the table,
    plot and claim skip it."""
    by = rows if isinstance(rows, dict) else {str(r["name"]): r for r in rows}
    presets = dict.fromkeys(str(r["preset"]) for r in by.values())
    return [
        (p, by[f"{p}/mha"], by[f"{p}/moe-mla-rope"]) for p in presets if {f"{p}/mha", f"{p}/moe-mla-rope"} <= by.keys()
    ]


def table7_markdown(rows: list[Row]) -> str:
    lines = [
        "| size | params (M) | MHA PPL | MoE-MLA-RoPE PPL | MHA bits/byte | MoE-MLA-RoPE bits/byte | relative (ours) "
        "| 95% CI (ours) | params (paper) | relative (paper) | 95% CI (paper) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for preset, mha, moe in paired_sizes(rows):
        rel, half, how = relative_improvement(moe, mha)
        paper = PAPER_TABLE7.get(preset)
        paper_cols = f"{paper[0]} | {paper[3]:+.1%} | ±{paper[4]:.1%}" if paper else "- | - | -"
        lines.append(
            f"| {preset} | {mha['total_params'] / 1e6:.2f} | {ppl_cell(mha)} | {ppl_cell(moe)} "
            f"| {bpb_cell(mha)} | {bpb_cell(moe)} "
            f"| {rel:+.1%} | ±{half:.1%} ({how}) | {paper_cols} |"
        )
    return "\n".join(lines)


def table4_markdown(rows: list[dict[str, object]]) -> str:
    full = base_row(rows, "1:1")
    lines = [
        "| compression | latent dim r | val PPL (ours) | bits/byte | val PPL (paper) | KV saving (ours) "
        "| KV saving (paper) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        ppl, saving = PAPER_TABLE4[str(r["name"])]
        ours = "-" if full is None else f"{1 - r['kv_cache_bytes_per_token'] / full['kv_cache_bytes_per_token']:.1%}"  # type: ignore[operator]
        cells = f"{ppl_cell(r)} | {bpb_cell(r)} | {ppl} | {ours} | {saving:.1%}"
        lines.append(f"| {r['name']} | {r['latent_dim']} | {cells} |")
    best = min(rows, key=lambda r: r["val_ppl_mean"])  # type: ignore[arg-type, return-value]
    lines.append(f"\nLowest perplexity here: {best['name']} (the paper names 2:1 the sweet spot; 1:1 is its lowest).")
    return "\n".join(lines)


def table5_markdown(rows: list[dict[str, object]]) -> str:
    lines = [
        "| design | total experts | expert width | val PPL (ours) | bits/byte | val PPL (paper) | load CV (ours) "
        "| load CV (paper) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        _, ppl, cv = PAPER_TABLE5[str(r["name"])]
        ours_cv = f"{r['max_load_cv']:.3f}" if r["max_load_cv"] is not None else "-"
        lines.append(
            f"| {r['name']} | {r['total_experts']} | {r['expert_width']} | {ppl_cell(r)} | {bpb_cell(r)} | {ppl} "
            f"| {ours_cv} | {cv:.2f} |"
        )
    return "\n".join(lines)


def params_note(rows: list[dict[str, object]]) -> str:
    return "Parameters per row: " + ", ".join(
        f"{r['name']} {r['total_params'] / 1e6:.2f}M total / {r['active_params'] / 1e6:.2f}M active" for r in rows
    )


def table4_figures(summary: list[Row], out: Path) -> list[Path]:
    """The quality/memory trade-off, relative to 1:1, beside the paper's."""
    full = base_row(summary, "1:1")
    return [figures.compression_tradeoff(summary, full, PAPER_TABLE4, out / "tradeoff.png")] if full else []


def table7_figures(summary: list[Row], out: Path) -> list[Path]:
    """The gain over MHA by model size, beside the paper's."""
    points = []
    for preset, mha, moe in paired_sizes(summary):
        rel, half, _ = relative_improvement(moe, mha)
        points.append((preset, float(mha["total_params"]), rel, half))  # type: ignore[arg-type]
    return [figures.scaling(points, PAPER_TABLE7, out / "scaling.png")] if points else []


@dataclass(frozen=True)
class Table:
    """One of the paper's tables, defined here whole: its runs, its report, the paper's numbers it is printed beside
    (moemla.paper) and its own figures; experiments/claims.py tests the paper's claims about it."""

    specs: Callable[[dict[str, ModelConfig], list[int]], list[RunSpec]]
    markdown: Callable[[list[Row]], str]
    help: str
    paper: object = None  # the paper's numbers for this table
    figures: Callable[[list[Row], Path], list[Path]] | None = None  # beyond the loss and load-CV curves
    multi_size: bool = False  # takes several size presets (table7)
    decode_speed: bool = False  # measures decode speed vs MHA after training (table3)
    judged: bool = False  # generates stories and scores them (table8)


TABLES = {
    "table2": Table(table2_specs, table2_markdown, "parameter-matched variants", PAPER_TABLE2),
    "table3": Table(table3_specs, table3_markdown, "FLOP-matched variants with decode speed", PAPER_TABLE3,
                    decode_speed=True),
    "table4": Table(table4_specs, table4_markdown, "KV compression 1:1..8:1", PAPER_TABLE4, table4_figures),
    "table5": Table(table5_specs, table5_markdown, "expert granularity 8/16/64", PAPER_TABLE5),
    "table7": Table(table7_specs, table7_markdown, "scaling over size presets", PAPER_TABLE7, table7_figures,
                    multi_size=True),
    "routing": Table(routing_specs, routing_markdown, "dynamic expert selection: top-k 2..8 vs top-p (§7, q. 3)"),
    "table8": Table(table8_specs, table8_markdown, "story quality by LLM judge (--endpoint) and statistics",
                    PAPER_TABLE8, judged=True),
}  # fmt: skip
