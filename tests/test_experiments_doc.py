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


def _folders() -> dict[str, np.ndarray]:
    """folder -> every number of its results.json (its runs, and their means and spreads)."""
    out = {}
    for path in sorted((ROOT / "results").glob("*/results.json")):
        res = json.loads(path.read_text())
        out[path.parent.name] = np.array(_values(res.get("runs")) + _values(res.get("summary")))
    return out


def _in(values: np.ndarray, printed: str) -> bool:
    """printed is one of values at its precision (within 0.6 of its last digit: a value rounded twice, 60.9249 ->
    60.925 -> 60.93, is still the same number)."""
    decimals = len(printed.split(".")[1])
    return values.size > 0 and float(np.abs(values - float(printed)).min()) <= 0.6 * 10**-decimals


def _perplexities(section: str) -> list[str]:
    """The numbers of a section's tables in perplexity columns (ours: "PPL", "seed N", "mean"; not the paper's, not
    an interpolated curve)."""
    found = []
    for table in re.findall(r"((?:^\|.*\|\n)+)", section, flags=re.M):
        rows = table.strip().splitlines()
        header = [h.strip().lower() for h in rows[0].strip("|").split("|")]
        ours = [bool(re.search(r"ppl|seeds? \d|mean", h)) and not re.search("paper|curve", h) for h in header]
        for row in rows[2:]:
            cells = [c.strip() for c in row.strip("|").split("|")]
            found += [n for keep, c in zip(ours, cells, strict=False) if keep for n, _ in NUMBER.findall(c)]
    return found


def test_every_perplexity_in_experiments_md_is_in_a_results_folder() -> None:
    folders = _folders()
    if not folders:
        pytest.skip("no results/ folder here")
    sections = re.split(r"\n(?=#{2,3} )", DOC.read_text())
    checked = 0
    for section in sections:
        if not re.search(r"^moemla reproduce (table\d|routing) ", section, flags=re.M):
            continue
        numbers = _perplexities(section)
        if not numbers:
            continue

        best = max(folders, key=lambda name, numbers=numbers: sum(_in(folders[name], n) for n in numbers))
        missing = [n for n in numbers if not _in(folders[best], n)]
        title = section.splitlines()[0]
        assert not missing, f"{title}: {missing} are in no results folder (closest: results/{best})"
        checked += 1
    assert checked >= 20, "EXPERIMENTS.md lost its tables, or the parser no longer finds them"
