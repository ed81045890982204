"""Parameter and FLOP matching (§4.3) computed by search, not assumed.

The paper says only that MoE models "reduce the hidden dimensions by sqrt(N/k)". Here a candidate
variant is matched to a reference (the dense MHA of the same size preset) by searching the hidden
size d (multiples of 2 x n_heads, so heads stay even for RoPE) and the feed-forward width (the
expert width for MoE, the MLP width for dense models; d alone moves in steps too coarse), for
the configuration whose total parameters (table2) or forward FLOPs per token (table3) are within
`tol` of the reference. Among those within tolerance the one nearest the candidate's own d wins,
then the smallest mismatch: a variant keeps its shape when it already matches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from moemla import accounting
from moemla.config import ConfigError, ModelConfig

Target = Literal["params", "flops"]


@dataclass(frozen=True)
class Match:
    cfg: ModelConfig
    value: int  # the candidate's measure after matching
    reference: int  # the reference's measure

    @property
    def ratio(self) -> float:
        return self.value / self.reference


def measure(cfg: ModelConfig, target: Target, context: int | None = None) -> int:
    if target == "params":
        return accounting.total_params(cfg)
    return accounting.flops_per_token(cfg, context)


def _nearest_width(cfg: ModelConfig, target: Target, goal: int, context: int | None) -> ModelConfig:
    """Feed-forward width (the measure grows with it) whose measure is nearest `goal`, by bisection."""
    field = "moe_inter_dim" if cfg.ffn == "moe" else "ffn_inter_dim"
    lo, hi = 1, 16 * cfg.dim
    while lo < hi:
        mid = (lo + hi) // 2
        if measure(cfg.replace(**{field: mid}), target, context) < goal:
            lo = mid + 1
        else:
            hi = mid
    options = [cfg.replace(**{field: w}) for w in {max(1, lo - 1), lo}]
    return min(options, key=lambda c: abs(measure(c, target, context) - goal))


def match(
    reference: ModelConfig, candidate: ModelConfig, target: Target, tol: float = 0.02, context: int | None = None
) -> Match:
    """The configuration nearest `candidate` whose measure is within `tol` of the reference's."""
    goal = measure(reference, target, context)
    step = 2 * candidate.n_heads
    best: tuple[tuple[bool, int, float], ModelConfig] | None = None
    for dim in range(step, 4 * candidate.dim + 1, step):
        try:
            cfg = candidate.replace(dim=dim)
        except ConfigError:
            continue
        off = abs(measure(cfg, target, context) / goal - 1)
        if off > tol:  # the preset's own widths do not match at this d: search the feed-forward width
            cfg = _nearest_width(cfg, target, goal, context)
            off = abs(measure(cfg, target, context) / goal - 1)
        score = (off > tol, abs(dim - candidate.dim), off)
        if best is None or score < best[0]:
            best = (score, cfg)
    if best is None or best[0][0]:
        raise ConfigError(f"no configuration of this variant is within {tol:.0%} of the reference's {target}")
    cfg = best[1]
    return Match(cfg, measure(cfg, target, context), goal)
