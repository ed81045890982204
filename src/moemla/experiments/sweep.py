"""Sweeps of training runs for the paper's tables: resumable, one folder per (configuration, seed)."""

from __future__ import annotations

import json
import shutil
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from moemla import accounting
from moemla.config import ConfigError, ModelConfig
from moemla.data.shards import PreparedData
from moemla.runs import RunFolder
from moemla.runs.folder import LOCK_FILE
from moemla.train.config import TrainConfig
from moemla.train.loop import train

# settings that change how a run executes, not what it trains: a finished run is reused whatever they were
EXECUTION_ONLY = {"compile", "device"}
COPIED_FILE = "copied_from.json"  # in a run folder that --reuse copied from another table's


@dataclass(frozen=True)
class RunSpec:
    name: str  # row of the table, e.g. "2:1"
    cfg: ModelConfig
    seed: int
    labels: dict[str, object] = field(default_factory=dict)  # extra columns, e.g. {"latent_dim": 256}

    @property
    def folder(self) -> str:
        return f"{self.name.replace(':', '-').replace('/', '-')}-seed{self.seed}"


def run_tc(spec: RunSpec, tc: TrainConfig) -> TrainConfig:
    """The training settings of one run of a sweep: its seed, and sequences no longer than its model's context."""
    return tc.replace(seed=spec.seed, seq_len=min(tc.seq_len, spec.cfg.max_seq_len))


def run_sweep(
    specs: list[RunSpec],
    data_dir: str | Path,
    out: str | Path,
    tc: TrainConfig,
    log: Callable[[str], None] = print,
    reuse: tuple[Path, ...] = (),
) -> list[dict[str, object]]:
    """Train every spec not yet finished (an interrupted sweep resumes), then collect each run's final metrics.
    A spec that a finished run under `reuse` (results folders) already trained is copied from there instead."""
    out = Path(out)
    data = PreparedData.open(data_dir)
    rows = []
    for i, spec in enumerate(specs, 1):
        run_dir = out / "runs" / spec.folder
        tc_i = run_tc(spec, tc)
        if RunFolder(run_dir).exists():
            _check_same_run(run_dir, spec.cfg, tc_i, data)
        elif (same := find_same_run(reuse, spec.cfg, tc_i, data)) is not None:
            copy_run(same, run_dir)
            log(f"run {i}/{len(specs)}: {spec.folder} copied from {same} (the same model, settings and data)")
        if RunFolder(run_dir).finished(tc.steps):
            log(f"run {i}/{len(specs)}: {spec.folder} already finished")
        else:
            log(f"run {i}/{len(specs)}: {spec.folder}")
            train(data_dir, run_dir, spec.cfg, tc_i, resume=True, log=log)
        metrics = RunFolder(run_dir).metrics()
        val = [r for r in metrics if r["split"] == "val"]
        rows.append(
            {
                "name": spec.name, "seed": spec.seed, **spec.labels, "val_loss": val[-1]["val_loss"],
                "val_ppl": val[-1]["val_ppl"], "val_ppl_ci95": val[-1]["val_ppl_ci95"],
                "bits_per_byte": val[-1].get("bits_per_byte"),
                "expert_load_cv": val[-1]["expert_load_cv"], "train_seconds": train_seconds(metrics),
                "device": train_device(metrics),
                "copied_from": copied_from(run_dir),
                "active_experts": val[-1].get("active_experts"),
                "total_params": accounting.total_params(spec.cfg), "active_params": accounting.active_params(spec.cfg),
                "kv_cache_bytes_per_token": accounting.kv_cache_bytes_per_token(spec.cfg), "run": str(run_dir),
            }
        )  # fmt: skip
    return rows


def train_seconds(metrics: list[dict]) -> float | None:
    """Wall time a run spent training, from its last training record (None without one)."""
    times = [r["elapsed_s"] for r in metrics if r["split"] == "train" and "elapsed_s" in r]
    return float(times[-1]) if times else None


def train_device(metrics: list[dict]) -> str | None:
    """What trained a run (e.g. "NVIDIA H200", "cpu, 1 thread"), every device in order where a resume moved it;
    None for runs recorded before training logged it."""
    found = [r["device"] for r in metrics if r["split"] == "train" and r.get("device")]
    return " then ".join(dict.fromkeys(found)) or None


def _check_same_run(run_dir: Path, cfg: ModelConfig, tc: TrainConfig, data: PreparedData) -> None:
    """A run found in the output folder must be this spec's run, or its numbers would be silently reused: the same
    model and data (RunFolder's "same run?" rule, as --resume) and the same training settings."""
    run = RunFolder.open(run_dir)
    meta = run.meta  # run.json read once; model_differences and data_difference read it again, once each
    found = TrainConfig.from_dict(meta["train"]).to_dict()  # a field added since reads as its default
    stored, asked = ModelConfig.from_dict(meta["model"]).to_dict(), cfg.to_dict()
    wanted = {k: v for k, v in tc.to_dict().items() if k not in EXECUTION_ONLY}
    differ = [f"model.{k}: {stored.get(k)!r} there, {asked[k]!r} now" for k in run.model_differences(cfg)]
    differ += [f"train.{k}: {found.get(k)!r} there, {v!r} now" for k, v in wanted.items() if found.get(k) != v]
    if run.data_difference(data.tokenizer_sha256, data.sha256, data.root) is not None:
        differ.append(f"data: {meta['data']['path']} there, {data.root} now")
    if differ:
        raise ConfigError(
            f"{run_dir} holds a run with other settings ({'; '.join(differ[:3])}); "
            "choose another --out for these settings, or delete that folder to retrain it"
        )


def find_same_run(folders: tuple[Path, ...], cfg: ModelConfig, tc: TrainConfig, data: PreparedData) -> Path | None:
    """A finished run under the results folders `folders` (their runs/) that trained exactly this: the same
    model, training settings (seed included) and prepared data. Another table's identical row (Table 7's `tiny`
    rows are Table 2's mha and moe-mla-rope) need not train twice."""
    for folder in folders:
        runs = folder / "runs" if (folder / "runs").is_dir() else folder
        for run_dir in sorted(p for p in runs.glob("*") if RunFolder(p).exists()):
            if not RunFolder(run_dir).finished(tc.steps):
                continue
            try:
                _check_same_run(run_dir, cfg, tc, data)
            except ConfigError:
                continue
            return run_dir
    return None


def copy_run(src: Path, dest: Path) -> None:
    """A finished run folder copied whole (checkpoints, metrics, run.json), appearing at `dest` only complete."""
    partial = dest.with_name(dest.name + ".copying")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(src, partial, ignore=shutil.ignore_patterns(LOCK_FILE))
    (partial / COPIED_FILE).write_text(json.dumps({"from": str(src)}) + "\n")  # its time was spent there
    partial.rename(dest)


def copied_from(run_dir: Path) -> str | None:
    """Where a run folder was copied from by --reuse (None: trained here)."""
    path = run_dir / COPIED_FILE
    return str(json.loads(path.read_text())["from"]) if path.is_file() else None


def aggregate(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    """One row per name (in first-seen order): perplexity mean and std over seeds, the rest from the first seed.

    Each seed counts once, in seed order (so per-seed lists of two rows pair seed with seed): a second record of
    the same name and seed (a results folder that lists a run twice, or a rerun beside the first) is one run, and
    a mean or p-value over copies of it would claim a precision nobody measured."""
    names = list(dict.fromkeys(r["name"] for r in rows))
    out = []
    for name in names:
        by_seed = {r.get("seed"): r for r in reversed([r for r in rows if r["name"] == name])}  # the first kept
        group = [by_seed[s] for s in sorted(by_seed, key=lambda s: (s is None, s))]
        ppl = [float(r["val_ppl"]) for r in group]  # type: ignore[arg-type]
        cvs = [max(r["expert_load_cv"]) for r in group if r["expert_load_cv"]]  # type: ignore[type-var]
        out.append(
            {
                **group[0],
                "val_ppl_mean": statistics.mean(ppl),
                "val_loss_mean": statistics.mean(float(r["val_loss"]) for r in group),  # type: ignore[arg-type]
                "val_ppl_std": statistics.stdev(ppl) if len(ppl) > 1 else 0.0,
                "seeds": len(group),
                "max_load_cv": statistics.mean(cvs) if cvs else None,
                "val_ppl_by_seed": ppl,
                "bits_per_byte_mean": _mean_or_none([r.get("bits_per_byte") for r in group]),
                "active_experts_mean": _mean_or_none([r.get("active_experts") for r in group]),
                "active_experts_by_seed": [r.get("active_experts") for r in group],
            }
        )
    return out


# what aggregate() computes over a name's seeds (the rest of a row is its first seed's, or added later)
STATISTICS = ("val_ppl_mean", "val_loss_mean", "val_ppl_std", "seeds", "max_load_cv", "val_ppl_by_seed",
              "bits_per_byte_mean", "active_experts_mean", "active_experts_by_seed")  # fmt: skip


def restated(result: dict) -> list[dict[str, object]]:
    """A results.json's summary rows with their statistics computed again from its runs by aggregate()'s rules:
    a table written before each seed counted once (`--seeds 0,0` once trained one run and counted it twice)
    reports over its distinct runs, not the copies its stored summary averaged."""
    fresh = {r["name"]: r for r in aggregate(result["runs"])}
    return [{**row, **{k: fresh[row["name"]][k] for k in STATISTICS if k in fresh.get(row["name"], {})}}
            for row in result["summary"]]  # fmt: skip


def _mean_or_none(values: list[object]) -> float | None:
    """Mean over seeds; None when any seed lacks the value (runs from before it was measured)."""
    return statistics.mean(float(v) for v in values) if all(v is not None for v in values) else None  # type: ignore[arg-type]
