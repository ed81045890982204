"""`moemla reproduce TABLE`: train a table's runs (skipping finished ones), then write its report:
TABLE.md beside the paper's numbers, results.json, figures and summary.md (the claims it tests)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moemla.config import DEFAULT_FLAVOR, SIZES, ConfigError, ModelConfig
from moemla.data.prepare import prepare_data
from moemla.data.shards import PreparedData
from moemla.data.sources import DataError
from moemla.experiments import claims, figures, summary
from moemla.experiments.rows import SEQ_LEN, base_row
from moemla.experiments.sweep import RunSpec, aggregate, restated, run_sweep
from moemla.experiments.tables import (
    TABLES,
    params_note,
)
from moemla.folders import check_destination
from moemla.runs import RunFolder
from moemla.train.config import TrainConfig

# CPU-scale settings, as the demo: small batches want a larger learning rate than §3.3's, and the
# sign balancing rule at 1e-2 reaches the paper's load CV in a short run (BENCHMARKS.md).
REPRODUCE_TRAIN = dict(batch_size=16, micro_batch_size=16, lr=2e-3, min_lr=1e-4, eval_tokens=32_768, log_interval=10)
BALANCE = dict(balance_rule="sign", balance_rate=1e-2)
# table3's decode speed: batch 16 as the paper's Table 6; the last of up to 64 new tokens fills the context
DECODE_BATCH, DECODE_NEW_TOKENS = 16, 64


@dataclass(frozen=True)
class Setup:
    """What a table's sweep trains: its runs (every size and seed), the training settings, the data and the folder."""

    specs: list[RunSpec]
    tc: TrainConfig
    data: Path
    out: Path
    presets: list[str]
    command: str  # the `moemla reproduce` command that sets this up again
    rows: list[str] | None = None  # a subset of the table's rows (--rows)
    reuse: tuple[Path, ...] = ()  # results folders whose identical finished runs are copied, not retrained


def setup(
    table: str,
    preset: str = "tiny",
    steps: int | None = 250,
    seeds: tuple[int, ...] = (0,),
    data: str | Path | None = None,
    out: str | Path | None = None,
    *,
    tokens: int | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    seq_len: int | None = None,
    rows: tuple[str, ...] | None = None,
    reuse: tuple[str | Path, ...] = (),
    flavor: str = DEFAULT_FLAVOR,
) -> Setup:
    """`preset` is one size, or for table7 a comma-separated list (one size means every size up to it)."""
    if table not in TABLES:
        raise ConfigError(f"unknown table {table!r}; available: {', '.join(TABLES)}")
    spec = TABLES[table]
    presets = _presets(preset, spec.multi_size)
    seq_len = seq_len or SEQ_LEN
    folder = Path(out or f"results/{table}-{presets[-1]}" + ("" if flavor == DEFAULT_FLAVOR else f"-{flavor}"))
    check_destination(folder, "reproduce", sources=(*([data] if data else []), *reuse), fix="choose another --out")
    if data is None:
        data, _ = prepare_data(out="data/builtin")
    vocab = PreparedData.open(data).vocab_size
    # every size trains on sequences of seq_len tokens (a shorter context, debug's 64, is raised to it)
    bases = {
        p: ModelConfig.from_preset(p, "moe-mla-rope", flavor, vocab_size=vocab, **BALANCE).replace(
            max_seq_len=max(seq_len, int(SIZES[p]["max_seq_len"]))  # type: ignore[call-overload]
        )
        for p in presets
    }
    length = dict(max_steps=None, tokens=tokens) if tokens else dict(max_steps=steps, tokens=None)
    batch = {"batch_size": batch_size, "micro_batch_size": min(batch_size, 64)} if batch_size else {}
    tc = TrainConfig(seq_len=seq_len, device=device, **length, **{**REPRODUCE_TRAIN, **batch})  # type: ignore[arg-type]
    interval = max(1, tc.steps // 5)
    tc = tc.replace(eval_interval=interval, ckpt_interval=interval)
    specs = spec.specs(bases, list(seeds))
    if rows:  # a subset of the table's rows, e.g. the RoPE control: mha, mha-rope, moe-mla-rope
        unknown = sorted(set(rows) - {r.name for r in specs})
        if unknown:
            raise ConfigError(f"{table} has no row(s) {unknown}; its rows: {sorted({r.name for r in specs})}")
        specs = [r for r in specs if r.name in rows]
    flags = f"--tokens {tokens}" if tokens else f"--steps {tc.steps}"
    flags += (f" --batch-size {tc.batch_size}" if batch_size else "") + (
        f" --seq-len {seq_len}" if seq_len != SEQ_LEN else ""
    )
    flags += f" --rows {','.join(rows)}" if rows else ""
    flags += f" --flavor {flavor}" if flavor != DEFAULT_FLAVOR else ""
    command = f"moemla reproduce {table} --preset {','.join(presets)} {flags} --seeds {','.join(map(str, seeds))}"
    missing = [str(f) for f in reuse if not Path(f).is_dir()]
    if missing:
        raise ConfigError(f"--reuse: no folder {', '.join(missing)}; give results folders such as results/table2-tiny")
    rows_ = list(rows) if rows else None
    return Setup(specs, tc, Path(data), folder, presets, command, rows_, tuple(Path(f) for f in reuse))


def reproduce(
    table: str,
    preset: str = "tiny",
    steps: int | None = 250,
    seeds: tuple[int, ...] = (0,),
    data: str | Path | None = None,
    out: str | Path | None = None,
    log: Callable[[str], None] = print,
    *,
    endpoint: str | None = None,
    judge_model: str | None = None,
    samples: int = 100,
    **shape: Any,
) -> dict[str, object]:
    """Train a table's runs in this process (finished ones are skipped), then report them. `shape` is setup()'s:
    tokens, device, batch_size, seq_len, rows, reuse.

    table8 judges its runs' stories at `endpoint` with `judge_model` (moemla.eval.quality), or computes
    only the judge-free statistics without an endpoint.
    """
    s = setup(table, preset, steps, seeds, data, out, **shape)
    spec = TABLES[table]
    runs = run_sweep(s.specs, s.data, s.out, s.tc, log, reuse=s.reuse)
    summary = aggregate(runs)
    if spec.decode_speed:
        _add_decode_speed(summary, s.tc.seq_len, s.tc.device, log)
    if spec.judged:
        _add_judgments(summary, s.out / "judge", endpoint, judge_model, samples, s.tc.device, log)
    result = {"table": table, "presets": s.presets, "command": s.command, "data": str(s.data), "train": s.tc.to_dict()}
    if s.rows:
        result["rows"] = s.rows
    report, tested = write_report(s.out, {**result, "runs": runs, "summary": summary})
    paths = _figures(table, runs, summary, s.out)
    log(f"wrote {s.out / f'{table}.md'}, {s.out / 'summary.md'}, results.json and {', '.join(p.name for p in paths)}")
    return {"summary": summary, "markdown": report, "out": str(s.out), "claims": tested}


def write_report(out: Path, result: dict) -> tuple[str, list[claims.Claim]]:
    """TABLE.md, results.json and summary.md from a table's results; returns the report and the tested claims."""
    table, presets, summary = result["table"], result["presets"], result["summary"]
    tc = TrainConfig.from_dict(result["train"])
    seeds = list(dict.fromkeys(r["seed"] for r in result["runs"]))
    report = "\n\n".join(
        [
            f"# {table}: {', '.join(presets)}, {tc.steps} steps of {tc.tokens_per_step:,} tokens, seeds {seeds}",
            f"Command: `{result['command']}` (data: `{result['data']}`{_trained_on(result['runs'])})",
            TABLES[table].markdown(summary),
            params_note(summary),
        ]
    )
    (out / f"{table}.md").write_text(report + "\n")
    (out / "results.json").write_text(json.dumps(result, indent=1))
    tested = [c for c in claims.check({table: {"summary": summary}}) if c.verdict != "not measured"]
    (out / "summary.md").write_text(claims.markdown(tested, f"{table}, {', '.join(presets)}"))
    return report, tested


def _trained_on(runs: list[dict]) -> str:
    """'; trained on ...' naming the devices the runs recorded (nothing for runs from before that was recorded)."""
    found = summary.devices(runs)
    return f"; trained on {found}" if found else ""


def _presets(preset: str, multi_size: bool) -> list[str]:
    names = [p.strip() for p in preset.split(",") if p.strip()]
    unknown = [p for p in names if p not in SIZES]
    if unknown or not names:
        raise ConfigError(f"unknown size preset {unknown or preset!r}; available: {', '.join(SIZES)}")
    if not multi_size:
        if len(names) > 1:
            raise ConfigError("only table7 takes several presets; give one --preset")
        return names
    if len(names) == 1:  # every size up to the one given, in SIZES order
        return list(SIZES)[: list(SIZES).index(names[0]) + 1]
    return sorted(set(names), key=list(SIZES).index)


def _add_decode_speed(summary: list[dict[str, object]], context: int, device: str, log: Callable[[str], None]) -> None:
    """Decode tokens/s of each row's model shape (random weights, as `moemla bench`), relative to mha."""
    from moemla.device import resolve_device
    from moemla.inference.bench import bench

    dev = resolve_device(device)
    for r in summary:
        cfg = RunFolder.open(str(r["run"])).model_config
        log(f"decode speed: {r['name']}")
        row = bench(cfg, DECODE_BATCH, context, min(DECODE_NEW_TOKENS, context // 4), device=dev)
        r["decode_tokens_per_s"] = row["decode_tokens_per_s"]
        r["decode_setting"] = f"{dev.type} fp32, batch {DECODE_BATCH}, context {context}, random weights"
    base = base_row(summary, "mha")
    for r in summary if base is not None else ():  # --rows without mha: no speed ratio to give
        r["decode_speedup_vs_mha"] = r["decode_tokens_per_s"] / base["decode_tokens_per_s"]  # type: ignore[operator]


def _add_judgments(
    summary: list[dict[str, object]], out: Path, endpoint: str | None, model: str | None, samples: int, device: str,
    log: Callable[[str], None],
) -> None:  # fmt: skip
    """Each row's judge scores (mean, std, n per dimension) and sample statistics, from its first seed's run."""
    from moemla.eval.quality import judge_runs
    from moemla.eval.samples import SampleSettings

    runs = [str(r["run"]) for r in summary]
    result = judge_runs(runs, out, endpoint, model, settings=SampleSettings(samples=samples), device=device, log=log)
    names = list(result["sample_stats"])  # type: ignore[call-overload]
    judged = result["judge"]["summary"] if result["judge"] else None  # type: ignore[index]
    for r, name in zip(summary, names, strict=True):
        r["sample_stats"] = result["sample_stats"][name]  # type: ignore[index]
        if judged is not None:
            r["judge"] = {d: {k: v[k] for k in ("mean", "std", "n")} for d, v in judged["models"][name].items()}
            r["unparsed"] = judged["unparsed"][name]


def _figures(table: str, rows: list[dict], summary: list[dict], out: Path) -> list[Path]:
    """Every table's loss and load-balance curves, then the table's own figures (Table.figures)."""
    paths = [figures.val_loss_curves(rows, out / "val_loss.png", f"{table}: validation loss")]
    cv = figures.load_cv_curves(rows, out / "load_cv.png", f"{table}: expert-load CV over training")
    paths += [cv] if cv else []
    own = TABLES[table].figures
    return paths + (own(summary, out) if own else [])


def summarize(results_dir: str | Path = "results") -> str:
    """summary.md over every table found under results_dir (each folder's results.json), corpus by corpus. It
    reads the tables and writes only summary.md: no results.json is rewritten (the back-fills of tables recorded
    before bits per byte and training times were a one-time migration, run on results/ and removed)."""
    root = Path(results_dir)
    if not root.is_dir():
        raise DataError(f"{root} is not a folder; give the results folder that `moemla reproduce TABLE --out` wrote")
    by_corpus: dict[str, list[dict]] = {}
    for path in sorted(root.glob("*/results.json")):
        try:
            res = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataError(
                f"{path} is not valid JSON ({err}); run that table's command again (its runs are kept) or move the "
                "folder aside"
            ) from None
        if "table" not in res:
            continue
        res["summary"] = restated(res)  # every mean and p-value over distinct runs, whatever wrote the file
        by_corpus.setdefault(summary.corpus(res), []).append({**res, "folder": path.parent.name})
    if by_corpus:
        text = summary.markdown(summary.ordered(by_corpus))
    else:
        text = claims.markdown(claims.check({}), "no tables run yet")
    (Path(results_dir) / "summary.md").write_text(text)
    return text
