"""EXPERIMENTS.md says what results/ holds: every perplexity in a table section with a `moemla reproduce` command
is a number of one folder under results/ (its runs or their means and spreads), at the precision printed."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "EXPERIMENTS.md"
NUMBER = re.compile(r"(?<![\d.])(\d+\.(\d+))(?![\d.])")


def _values(obj: object) -> list[float]:
    if isinstance(obj, bool):
        return []
    if isinstance(obj, int | float):
        return [float(obj)]
    if isinstance(obj, list):
        return [v for x in obj for v in _values(x)]
    if isinstance(obj, dict):
        return [v for x in obj.values() for v in _values(x)]
    return []


def _folders() -> dict[str, dict]:
    """folder -> its results.json (runs: one per variant and seed; summary: one per variant, means and spreads)."""
    return {
        path.parent.name: json.loads(path.read_text()) for path in sorted((ROOT / "results").glob("*/results.json"))
    }


def _all(res: dict, name: str | None = None) -> np.ndarray:
    """Every number of a folder's runs and summary, or only those of the rows called `name`."""
    keep = [r for part in ("runs", "summary") for r in res.get(part) or [] if name is None or r.get("name") == name]
    return np.array(_values(keep))


def _in(values: np.ndarray, printed: str) -> bool:
    """printed is one of values at its precision (within 0.6 of its last digit: a value rounded twice, 60.9249 ->
    60.925 -> 60.93, is still the same number)."""
    decimals = len(printed.split(".")[1])
    return values.size > 0 and float(np.abs(values - float(printed)).min()) <= 0.6 * 10**-decimals


def _perplexities(section: str) -> list[tuple[str, str, str]]:
    """(row name, column header, number) of a section's tables in perplexity columns (ours: "PPL", "seed N",
    "mean"; not the paper's, not an interpolated curve)."""
    found = []
    for table in re.findall(r"((?:^\|.*\|\n)+)", section, flags=re.M):
        rows = table.strip().splitlines()
        header = [h.strip().lower() for h in rows[0].strip("|").split("|")]
        ours = [bool(re.search(r"ppl|seeds? \d|mean", h)) and not re.search("paper|curve", h) for h in header]
        for row in rows[2:]:
            cells = [c.strip() for c in row.strip("|").split("|")]
            name = re.sub(r"[*`]", "", cells[0]).split(" ")[0]
            for keep, head, cell in zip(ours, header, cells, strict=False):
                found += [(name, head, n) for n, _ in NUMBER.findall(cell)] if keep else []
    return found


def _row_misses(res: dict, found: list[tuple[str, str, str]]) -> list[str]:
    """The numbers that are not their own row's: a "seed N" cell is that variant's run with seed N, any other
    perplexity cell one of that variant's numbers; a row not named after a run is checked against the folder."""
    names = {r.get("name") for r in res.get("runs") or []}
    misses = []
    for name, head, printed in found:
        if name not in names:
            ok = _in(_all(res), printed)
        elif seed := re.fullmatch(r"seed (\d+)", head):
            runs = [r for r in res["runs"] if r.get("name") == name and r.get("seed") == int(seed.group(1))]
            ok = any(_in(np.array([r["val_ppl"]]), printed) for r in runs)
        else:
            ok = _in(_all(res, name), printed)
        if not ok:
            misses.append(f"{name} {head}: {printed}")
    return misses


def test_every_perplexity_in_experiments_md_is_its_rows_in_a_results_folder() -> None:
    folders = _folders()
    if not folders:
        pytest.skip("no results/ folder here")
    sections = re.split(r"\n(?=#{2,3} )", DOC.read_text())
    checked = 0
    for section in sections:
        if not re.search(r"^moemla reproduce (table\d|routing) ", section, flags=re.M):
            continue
        found = _perplexities(section)
        if not found:
            continue
        best = min(folders, key=lambda name, found=found: len(_row_misses(folders[name], found)))
        missing = _row_misses(folders[best], found)
        title = section.splitlines()[0]
        assert not missing, f"{title}: {missing} are not their rows' numbers in any results folder (closest: {best})"
        checked += 1
    assert checked >= 20, "EXPERIMENTS.md lost its tables, or the parser no longer finds them"


def test_a_swapped_row_fails() -> None:
    """The check above is row by row: two rows' numbers swapped in a copy of a table are caught."""
    folders = _folders()
    if "table2-tiny-control" not in folders:
        pytest.skip("no results/ folder here")
    res = folders["table2-tiny-control"]
    seed0 = {r["name"]: r["val_ppl"] for r in res["runs"] if r["seed"] == 0}
    good = [("mha", "seed 0", f"{seed0['mha']:.3f}"), ("mha-rope", "seed 0", f"{seed0['mha-rope']:.3f}")]
    swapped = [(good[0][0], "seed 0", good[1][2]), (good[1][0], "seed 0", good[0][2])]
    assert not _row_misses(res, good)
    assert len(_row_misses(res, swapped)) == 2
