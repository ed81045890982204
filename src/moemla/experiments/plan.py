"""`moemla reproduce TABLE --plan`: each run's tokens and its estimated time on this device, before any training.

The estimate is measured, not modelled: every distinct model of the table trains PROBE_STEPS real steps (the same
settings, data and code path as the sweep, compiled where the sweep would compile) in a scratch folder. The first
step's time stands for the warm-up (allocation, compilation); the later steps give the steady rate.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from moemla import accounting
from moemla.data.shards import PreparedData
from moemla.experiments.reproduce import Setup
from moemla.experiments.sweep import find_same_run, run_tc
from moemla.progress import duration
from moemla.runs import RunFolder
from moemla.train.loop import train

PROBE_STEPS = 3


def plan(s: Setup, log: Callable[[str], None] = print) -> list[dict[str, object]]:
    """One row per run (every seed): its tokens and estimated seconds, from a probe of its model. A run already
    finished, or one --reuse would copy, needs no estimate; a model with no run left to train is not probed."""
    data = PreparedData.open(s.data)
    probes: dict[str, tuple[float, float]] = {}  # model config (as text) -> (warm-up s, s per step)
    rows, keys = [], []
    for spec in s.specs:
        tc = run_tc(spec, s.tc)
        run_dir = s.out / "runs" / spec.folder
        finished = RunFolder(run_dir).finished(tc.steps)
        same = None if finished or run_dir.exists() else find_same_run(s.reuse, spec.cfg, tc, data)
        rows.append({
            "run": spec.folder, "total_params": accounting.total_params(spec.cfg),
            "active_params": accounting.active_params(spec.cfg), "steps": tc.steps,
            "tokens": tc.steps * tc.tokens_per_step, "finished": finished, "reused": str(same) if same else None,
        })  # fmt: skip
        key = repr(spec.cfg)
        if not (finished or same) and key not in probes:
            log(f"probing {spec.name}: {PROBE_STEPS} steps")
            probes[key] = _probe(s, spec.cfg)
        keys.append(key)
    for r, key in zip(rows, keys, strict=True):  # a finished seed shows the rate its model's other seeds were probed at
        warmup, per_step = probes.get(key) or (0.0, None)
        r["seconds_per_step"] = per_step
        r["estimated_s"] = None if per_step is None else warmup + (int(r["steps"]) - 1) * per_step  # type: ignore[call-overload]
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


def cpu_load() -> float | None:
    """The 1-minute load average, where the OS keeps one (not on Windows)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def busy_note(load: float | None, cores: int) -> str | None:
    """A warning when other work held the CPU as the probes ran: CPU processes share cores, so a probe beside
    them runs slower (2-5x on our 2-core machine beside one training run) and so do its estimates."""
    if load is None or load <= cores / 2:
        return None
    return (f"The CPU was busy when the probes ran (load average {load:.1f} on {cores} cores), so these estimates "
            "run high; for a true estimate plan on an otherwise idle machine.")  # fmt: skip


def plan_markdown(rows: list[dict[str, object]], device: str, note: str | None = None) -> str:
    """The plan as a table for people, with the total of the runs still to train."""
    lines = [
        "| run | params (active) | steps | tokens | s/step | estimated |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        params = f"{r['total_params'] / 1e6:.2f}M ({r['active_params'] / 1e6:.2f}M)"  # type: ignore[operator]
        if r["finished"]:
            when = "finished"
        elif r.get("reused"):
            when = f"copied from {Path(str(r['reused'])).parent.parent.name}"
        else:
            when = duration(float(r["estimated_s"]))  # type: ignore[arg-type]
        rate = "-" if r["seconds_per_step"] is None else f"{r['seconds_per_step']:.3f}"
        lines.append(f"| {r['run']} | {params} | {r['steps']:,} | {r['tokens']:,} | {rate} | {when} |")
    left_rows = [r for r in rows if not (r["finished"] or r.get("reused"))]
    todo = sum(float(r["estimated_s"]) for r in left_rows)  # type: ignore[arg-type]
    left = len(left_rows)
    lines.append(f"\nTo train: {left} of {len(rows)} runs, about {duration(todo)} on {device} (one process, one run "
                 "after another; evaluation and checkpoints not included).")  # fmt: skip
    if note and left:  # nothing probed, nothing to warn about
        lines.append(note)
    return "\n".join(lines)
