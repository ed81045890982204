"""What every table shares: the context its runs train at, and a row's statistics over seeds as Markdown cells
(mean ± spread, change against a base row with its paired test, bits per byte)."""

from __future__ import annotations

Row = dict[str, object]  # one table row: a run name's metrics aggregated over seeds (sweep.aggregate)

# every table trains on sequences of SEQ_LEN tokens; table3 matches FLOPs at this context
SEQ_LEN = 256


def paired_p_value(a: list[float], b: list[float]) -> float | None:
    """Two-sided paired t-test over seeds (scipy); None with fewer than 2 pairs or without scipy."""
    if len(a) < 2 or len(a) != len(b):
        return None
    try:
        from scipy.stats import ttest_rel
    except ImportError:
        return None
    return float(ttest_rel(a, b).pvalue)


def base_row(rows: list[Row], name: str) -> Row | None:
    """The row the others are compared with, or None where --rows left it out (its columns then show "-")."""
    return next((r for r in rows if r["name"] == name), None)


def versus(row: Row, base: Row | None) -> tuple[str, str]:
    """Perplexity relative to the base row's (MHA) and the paired t-test's p-value, as text ("-" for the base
    itself, for 1 seed, or where the base row was not run)."""
    if base is None:
        return "-", "-"
    p = paired_p_value(row["val_ppl_by_seed"], base["val_ppl_by_seed"]) if row is not base else None  # type: ignore[arg-type]
    return f"{row['val_ppl_mean'] / base['val_ppl_mean'] - 1:+.1%}", "-" if p is None else f"{p:.3g}"  # type: ignore[operator]


def ppl_cell(row: dict[str, object]) -> str:
    if row["seeds"] == 1:
        return f"{row['val_ppl_mean']:.3f} (1 seed)"
    return f"{row['val_ppl_mean']:.3f} ± {row['val_ppl_std']:.3f}"


def bpb_cell(row: Row) -> str:
    """Validation bits per byte (mean over seeds): comparable across tokenizers, unlike perplexity."""
    value = row.get("bits_per_byte_mean")
    return "-" if value is None else f"{value:.4f}"
