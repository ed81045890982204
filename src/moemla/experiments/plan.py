"""`moemla reproduce TABLE --plan`: each run's tokens and its estimated time on this device, before any training.

The estimate is measured, not modelled: every distinct model of the table trains PROBE_STEPS real steps (the same
settings, data and code path as the sweep, compiled where the sweep would compile) in a scratch folder. The first
step's time stands for the warm-up (allocation, compilation); the later steps give the steady rate.
"""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Callable
from pathlib import Path

from moemla import accounting
from moemla.experiments.reproduce import Setup
from moemla.progress import duration
from moemla.runs import RunFolder
from moemla.train.loop import train

PROBE_STEPS = 3


def plan(s: Setup, log: Callable[[str], None] = print) -> list[dict[str, object]]:
    """One row per run (every seed): its tokens and estimated seconds, from a probe of its model."""
    probes: dict[str, tuple[float, float]] = {}  # model config (as JSON) -> (warm-up s, s per step)
    rows = []
    for spec in s.specs:
        key = repr(spec.cfg)
        if key not in probes:
            log(f"probing {spec.name}: {PROBE_STEPS} steps")
            probes[key] = _probe(s, spec.cfg)
        warmup, per_step = probes[key]
        tc = s.tc.replace(seq_len=min(s.tc.seq_len, spec.cfg.max_seq_len))
        rows.append({
            "run": spec.folder, "total_params": accounting.total_params(spec.cfg),
            "active_params": accounting.active_params(spec.cfg), "steps": tc.steps,
            "tokens": tc.steps * tc.tokens_per_step, "seconds_per_step": per_step,
            "estimated_s": warmup + (tc.steps - 1) * per_step,
            "finished": RunFolder(s.out / "runs" / spec.folder).finished(tc.steps),
        })  # fmt: skip
    return rows


def _probe(s: Setup, cfg: object) -> tuple[float, float]:
    """(seconds of the first step, mean seconds of the later ones) of PROBE_STEPS real training steps."""
    tc = s.tc.replace(
        max_steps=PROBE_STEPS, tokens=None, log_interval=1, eval_interval=10**9, ckpt_interval=10**9,
        eval_tokens=s.tc.seq_len * s.tc.micro_batch_size, keep_checkpoints=1,
    )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="moemla-plan-") as tmp:
        train(s.data, Path(tmp) / "probe", cfg, tc, log=lambda _: None)  # type: ignore[arg-type]
        elapsed = [r["elapsed_s"] for r in RunFolder(Path(tmp) / "probe").metrics() if r["split"] == "train"]
    later = [b - a for a, b in itertools.pairwise(elapsed)]
    return elapsed[0], sum(later) / len(later)


def plan_markdown(rows: list[dict[str, object]], device: str) -> str:
    """The plan as a table for people, with the total of the runs still to train."""
    lines = [
        "| run | params (active) | steps | tokens | s/step | estimated |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        params = f"{r['total_params'] / 1e6:.2f}M ({r['active_params'] / 1e6:.2f}M)"  # type: ignore[operator]
        when = "finished" if r["finished"] else duration(float(r["estimated_s"]))  # type: ignore[arg-type]
        lines.append(f"| {r['run']} | {params} | {r['steps']:,} | {r['tokens']:,} | {r['seconds_per_step']:.3f} "
                     f"| {when} |")  # fmt: skip
    todo = sum(float(r["estimated_s"]) for r in rows if not r["finished"])  # type: ignore[arg-type]
    left = sum(not r["finished"] for r in rows)
    lines.append(f"\nTo train: {left} of {len(rows)} runs, about {duration(todo)} on {device} (one process, one run "
                 "after another; evaluation and checkpoints not included).")  # fmt: skip
    return "\n".join(lines)
