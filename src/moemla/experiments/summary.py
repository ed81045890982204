"""results/summary.md: the paper's claims on every corpus under results/, each taken from the table that tested
it with the most seeds; bits per byte of every table's rows across corpora; the CPU time each table took."""

from __future__ import annotations

import math
import statistics
from dataclasses import replace
from pathlib import Path

from moemla.experiments import claims
from moemla.experiments.claims import Claim
from moemla.experiments.tables import TABLES
from moemla.folders import MANIFEST

# corpora by their prepared folder's name, in the order the summary shows them (others follow, by name)
CORPORA = {
    "builtin": "the built-in corpus",
    "tinystories-sample": "the TinyStories sample (../shared/data)",
    "stdlib": "Python's standard library (code)",
}


def corpus(result: dict) -> str:
    """The corpus a table was trained on: its prepared data folder's name."""
    return Path(str(result["data"])).name


def best_claims(results: list[dict]) -> list[Claim]:
    """The claims over one corpus's tables, each at every size it was measured at (a tiny Table 2 and an xs one
    are two rows, never mixed). At one size a table's claims come from its full run (all rows), unless a run of
    fewer rows (--rows, e.g. the RoPE control) tested the same claim with more seeds; `source` says which."""
    full_first = sorted(results, key=lambda r: (bool(r.get("rows")), -_seeds(r)))
    chosen: dict[str, dict] = {}
    for res in full_first:
        chosen.setdefault(res["table"], res)
    listed = claims.check({t: r for t, r in chosen.items()})  # every claim in order, measured or not
    balance_text = claims.balance_claims({})[0].text  # over every table at once, below
    best: dict[tuple[str, str], Claim] = {}
    for res in full_first:
        for c in claims.check({res["table"]: res}):
            if c.verdict == "not measured" or c.text == balance_text:
                continue
            c = replace(c, source=str(res["folder"]), size=size(res))
            if (c.text, c.size) not in best or c.seeds > best[c.text, c.size].seeds:
                best[c.text, c.size] = c
    balance = {c.text: c for c in claims.balance_claims({str(r["folder"]): r for r in results})}
    out: list[Claim] = []
    for text in dict.fromkeys(c.text for c in listed) | dict.fromkeys(t for t, _ in best):
        measured = sorted((c for (t, _), c in best.items() if t == text), key=lambda c: _size_order(c.size))
        out += [balance[text]] if text in balance else measured or [c for c in listed if c.text == text]
    return out


def size(result: dict) -> str:
    """The size preset(s) a table was trained at: one, or Table 7's list."""
    return ", ".join(result.get("presets") or ["?"])


def _size_order(label: str) -> tuple[int, int]:
    """Smaller sizes first; a list of sizes (Table 7) after its largest alone."""
    from moemla.config import SIZES

    names = label.split(", ")
    return (list(SIZES).index(names[-1]) if names[-1] in SIZES else len(SIZES), len(names))


def _seeds(result: dict) -> int:
    return len({r["seed"] for r in result["runs"]})


def bits_per_byte_table(by_corpus: dict[str, list[dict]]) -> str:
    """Every table's rows in bits per byte (comparable across tokenizers and corpora): mean ± 95% interval over
    seeds, each row from the run of its corpus that trained it with the most seeds."""
    cells: dict[tuple[str, str, str], dict[str, str]] = {}
    for name, results in by_corpus.items():
        for res in sorted(results, key=_seeds):  # most seeds last, wins
            for row in dict.fromkeys(str(r["name"]) for r in res["runs"]):
                values = [r.get("bits_per_byte") for r in res["runs"] if r["name"] == row]
                if all(v is not None for v in values):
                    at, variant = row.split("/", 1) if "/" in row else (size(res), row)  # Table 7's rows: "tiny/mha"
                    cells.setdefault((res["table"], at, variant), {})[name] = _mean_interval([float(x) for x in values])  # type: ignore[arg-type]
    if not cells:
        return "No table has bits per byte yet."
    names = list(by_corpus)
    # stable: rows keep first-seen order within a table and size
    order = sorted(cells, key=lambda key: (list(TABLES).index(key[0]), _size_order(key[1])))
    lines = ["| table | size | row | " + " | ".join(_label(n) for n in names) + " |"]
    lines.append("| --- | --- | --- |" + " --- |" * len(names))
    for key in order:
        lines.append("| " + " | ".join(key) + " | " + " | ".join(cells[key].get(n, "-") for n in names) + " |")
    return "\n".join(lines)


def _mean_interval(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.4f} (1 seed)"
    from scipy.stats import t

    half = t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return f"{statistics.mean(values):.4f} ± {half:.4f} ({len(values)} seeds)"


def time_table(by_corpus: dict[str, list[dict]]) -> str:
    """The CPU (or GPU) time each table's runs took to train, from the runs' own records (runs --reuse copied from
    another table counted there, not here), and how many passes
    over its corpus's training split each run made (where the data folder is at hand): watch for over-fitting."""
    lines = [
        "| table | corpus | size | runs | seeds | training time | device | epochs per run |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, results in by_corpus.items():
        for res in results:
            here = [r for r in res["runs"] if not r.get("copied_from")]  # a copied run's time was another table's
            seconds = [r.get("train_seconds") for r in here]
            took = f"{sum(seconds) / 60:.0f} min" if all(s is not None for s in seconds) else "not recorded"
            took += f" (+ {len(res['runs']) - len(here)} runs copied)" if len(here) < len(res["runs"]) else ""
            where = f"{_label(name)} | {size(res)} | {len(res['runs'])} | {_seeds(res)} | {took}"
            where += f" | {devices(res['runs']) or res['train'].get('device')}"
            lines.append(f"| {res['folder']} | {where} | {_epochs(res)} |")
    return "\n".join(lines)


def devices(runs: list[dict]) -> str:
    """The devices that trained a table's runs, as their records name them ("; " apart: a name may hold a comma);
    runs --reuse copied trained elsewhere, and runs from before devices were recorded name none."""
    return "; ".join(dict.fromkeys(str(r["device"]) for r in runs if r.get("device") and not r.get("copied_from")))


def _epochs(result: dict) -> str:
    """Training tokens per run over the training split's tokens."""
    from moemla.data.shards import PreparedData
    from moemla.train.config import TrainConfig

    if not (Path(str(result["data"])) / MANIFEST).is_file() or not result["train"]:
        return "-"
    tc = TrainConfig.from_dict(result["train"])
    return f"{tc.steps * tc.tokens_per_step / PreparedData.open(result['data']).tokens('train'):.2f}"


def _label(name: str) -> str:
    return CORPORA.get(name, name)


def markdown(by_corpus: dict[str, list[dict]]) -> str:
    """The whole summary: per corpus, every claim with its verdict and source; then bits per byte and times."""
    parts = [claims.preamble("every corpus under results/")]
    parts.append(
        "Each claim is taken, at each size it was measured at, from the table that tested it with the most seeds: "
        "a full table, or a run of a few of its rows with more seeds (`--rows`, e.g. the RoPE control); the last "
        "column names it."
    )
    for name, results in by_corpus.items():
        rows = best_claims(results)
        lines = [f"## On {_label(name)}", "", "| claim | size | paper | ours | verdict | note | from |"]
        lines.append("| --- | --- | --- | --- | --- | --- | --- |")
        lines += [
            f"| {c.text} | {c.size or '-'} | {c.paper} | {c.ours} | **{c.verdict}** | {c.why} | {c.source} |"
            for c in rows
        ]
        parts.append("\n".join(lines))
    parts.append("## Bits per byte across corpora (every table's rows)\n\n" + bits_per_byte_table(by_corpus))
    parts.append("## Training time per table\n\n" + time_table(by_corpus))
    return "\n\n".join(parts) + "\n"


def ordered(by_corpus: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """Corpora in CORPORA's order, then the rest by name; each corpus's tables in TABLES order."""
    keys = sorted(by_corpus, key=lambda n: (list(CORPORA).index(n) if n in CORPORA else len(CORPORA), n))
    return {k: sorted(by_corpus[k], key=lambda r: (list(TABLES).index(r["table"]), r["folder"])) for k in keys}
