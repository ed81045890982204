"""`moemla reproduce TABLE`: train a table's runs (skipping finished ones), then write its report."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from moemla.commands import prepare_data
from moemla.config import ConfigError, ModelConfig
from moemla.data.shards import PreparedData
from moemla.experiments.sweep import aggregate, run_sweep
from moemla.experiments.tables import TABLES, params_note
from moemla.train.config import TrainConfig

# CPU-scale settings, as the demo: small batches want a larger learning rate than §3.3's, and the
# sign balancing rule at 1e-2 reaches the paper's load CV in a short run (BENCHMARKS.md).
REPRODUCE_TRAIN = dict(batch_size=16, micro_batch_size=16, lr=2e-3, min_lr=1e-4, eval_tokens=32_768, log_interval=10)
BALANCE = dict(balance_rule="sign", balance_rate=1e-2)


def reproduce(
    table: str,
    preset: str = "tiny",
    steps: int = 250,
    seeds: tuple[int, ...] = (0,),
    data: str | Path | None = None,
    out: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, object]:
    if table not in TABLES:
        raise ConfigError(f"unknown table {table!r}; available: {', '.join(TABLES)}")
    out = Path(out or f"results/{table}-{preset}")
    if data is None:
        data, _ = prepare_data("builtin", None, "data/builtin", "bpe", 4096, 20_000, 0, 0.05, False)
    vocab = PreparedData.open(data).vocab_size
    base = ModelConfig.from_preset(preset, "moe-mla-rope", vocab_size=vocab, **BALANCE)
    interval = max(1, steps // 5)
    tc = TrainConfig(
        max_steps=steps, seq_len=min(256, base.max_seq_len), eval_interval=interval, ckpt_interval=interval,
        **REPRODUCE_TRAIN,  # type: ignore[arg-type]
    )  # fmt: skip
    specs_for, markdown_for = TABLES[table]
    rows = run_sweep(specs_for(base, list(seeds)), data, out, tc, log)
    summary = aggregate(rows)
    command = f"moemla reproduce {table} --preset {preset} --steps {steps} --seeds {','.join(map(str, seeds))}"
    report = "\n\n".join(
        [
            f"# {table}: {preset}, {steps} steps of {tc.tokens_per_step:,} tokens, seeds {list(seeds)}",
            f"Command: `{command}` (data: `{data}`)",
            markdown_for(summary),
            params_note(summary),
        ]
    )
    (out / f"{table}.md").write_text(report + "\n")
    (out / "results.json").write_text(json.dumps({"train": tc.to_dict(), "runs": rows, "summary": summary}, indent=1))
    return {"summary": summary, "markdown": report, "out": str(out)}
