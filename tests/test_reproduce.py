import json
from pathlib import Path

import pytest

from moemla.config import VARIANTS, ModelConfig
from moemla.data.shards import prepare
from moemla.data.sources import builtin_source
from moemla.experiments.reproduce import reproduce
from moemla.experiments.tables import table5_specs


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "builtin"
    prepare(builtin_source(300), out, {"dataset": "builtin", "stories": 300}, vocab_size=300)
    return out


def test_table4_sweep_runs_reports_and_resumes(data: Path, tmp_path: Path) -> None:
    log: list[str] = []
    result = reproduce("table4", "debug", steps=2, seeds=(0, 1), data=data, out=tmp_path / "t4", log=log.append)
    summary = {r["name"]: r for r in result["summary"]}
    assert list(summary) == ["1:1", "2:1", "4:1", "8:1"] and all(r["seeds"] == 2 for r in summary.values())
    assert [summary[n]["latent_dim"] for n in summary] == [32, 16, 8, 4]
    md = (tmp_path / "t4" / "table4.md").read_text()
    assert "| 2:1 | 16 |" in md and "| 50.0% | 50.0% |" in md and "7.388" in md
    assert len(json.loads((tmp_path / "t4" / "results.json").read_text())["runs"]) == 8
    # a second call finds every run finished and trains nothing
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "t4" / "runs").glob("*/checkpoints/latest")}
    log.clear()
    again = reproduce("table4", "debug", steps=2, seeds=(0, 1), data=data, out=tmp_path / "t4", log=log.append)
    assert all("already finished" in line for line in log) and len(log) == 8
    assert stamps == {p: p.stat().st_mtime_ns for p in stamps}
    assert again["summary"] == result["summary"]


def test_table5_holds_total_expert_parameters_and_8_active() -> None:
    base = ModelConfig.from_preset("tiny", "moe-mla-rope")
    specs = table5_specs(base, [0])
    assert [s.cfg.n_routed_experts + s.cfg.n_shared_experts for s in specs] == [8, 16, 64]
    assert all(s.cfg.n_activated_experts + s.cfg.n_shared_experts == 8 for s in specs)
    totals = {(s.cfg.n_routed_experts + s.cfg.n_shared_experts) * s.cfg.expert_inter_dim for s in specs}
    assert len(totals) == 1


def test_table2_is_parameter_matched_with_paired_t_tests(data: Path, tmp_path: Path) -> None:
    result = reproduce("table2", "debug", steps=2, seeds=(0, 1), data=data, out=tmp_path / "t2", log=lambda _: None)
    rows = {r["name"]: r for r in result["summary"]}
    assert set(rows) == set(VARIANTS)
    assert all(abs(r["matched_ratio"] - 1) <= 0.02 for r in rows.values())
    md = result["markdown"]
    assert "(our addition)" in md and "8.542" in md
    assert md.count("| mha |") == 1 and "| - | 8.542 | +0.0% |" in md  # no test of mha against itself
    p_values = [line.split("|")[8].strip() for line in md.splitlines() if line.startswith("| moe-")]
    assert p_values and all(p != "-" for p in p_values)
