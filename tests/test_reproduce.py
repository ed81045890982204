import json
import re
from pathlib import Path

import pytest

from moemla.config import VARIANTS, ConfigError, ModelConfig
from moemla.data.shards import write_prepared
from moemla.data.sources import builtin_source
from moemla.experiments.claims import _quality
from moemla.experiments.reproduce import reproduce, summarize
from moemla.experiments.tables import relative_improvement, table5_specs


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "builtin"
    write_prepared(builtin_source(300), out, {"dataset": "builtin", "stories": 300}, vocab_size=300)
    return out


def test_table4_sweep_runs_reports_and_resumes(data: Path, tmp_path: Path) -> None:
    log: list[str] = []
    result = reproduce("table4", "debug", steps=2, seeds=(0, 1), data=data, out=tmp_path / "t4", log=log.append)
    summary = {r["name"]: r for r in result["summary"]}
    assert list(summary) == ["1:1", "2:1", "4:1", "8:1"] and all(r["seeds"] == 2 for r in summary.values())
    assert [summary[n]["latent_dim"] for n in summary] == [32, 16, 8, 4]
    md = (tmp_path / "t4" / "table4.md").read_text()
    for figure in ("val_loss.png", "load_cv.png", "tradeoff.png"):
        assert (tmp_path / "t4" / figure).stat().st_size > 10_000
    claims = (tmp_path / "t4" / "summary.md").read_text()
    assert "2:1 is the best compression" in claims and "CV below 0.1" in claims
    assert "68%" not in claims  # table4 does not measure the variants against MHA
    assert "| 2:1 | 16 |" in md and "| 50.0% | 50.0% |" in md and "7.388" in md
    saved = json.loads((tmp_path / "t4" / "results.json").read_text())
    assert len(saved["runs"]) == 8 and all(r["bits_per_byte"] > 0 for r in saved["runs"])
    assert "bits/byte" in md
    # `reproduce summary` reads the tables and writes summary.md; it rewrites no results.json
    before = {p: p.read_bytes() for p in tmp_path.rglob("results.json")}
    summarize(tmp_path)
    assert {p: p.read_bytes() for p in tmp_path.rglob("results.json")} == before
    # a second call finds every run finished and trains nothing
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "t4" / "runs").glob("*/checkpoints/latest")}
    log.clear()
    again = reproduce("table4", "debug", steps=2, seeds=(0, 1), data=data, out=tmp_path / "t4", log=log.append)
    runs = [line for line in log if line.startswith("run ")]
    assert all("already finished" in line for line in runs) and len(runs) == 8
    assert stamps == {p: p.stat().st_mtime_ns for p in stamps}
    assert again["summary"] == result["summary"]
    # a run made before a config field existed ran with its default, so it is still this spec's run
    meta_file = tmp_path / "t4" / "runs" / "1-1-seed0" / "run.json"
    meta = json.loads(meta_file.read_text())
    for key in ("routing", "routing_p", "min_activated_experts"):
        del meta["model"][key]
    meta_file.write_text(json.dumps(meta))
    log.clear()
    reproduce("table4", "debug", steps=2, seeds=(0,), data=data, out=tmp_path / "t4", log=log.append)
    assert all("already finished" in line for line in log if line.startswith("run "))
    # finished runs with other settings are never silently reused
    with pytest.raises(ConfigError, match=r"train.max_steps: 2 there, 3 now.*another --out"):
        reproduce("table4", "debug", steps=3, seeds=(0,), data=data, out=tmp_path / "t4", log=log.append)


def test_table5_holds_total_expert_parameters_and_8_active() -> None:
    base = ModelConfig.from_preset("tiny", "moe-mla-rope")
    specs = table5_specs({"tiny": base}, [0])
    assert [s.cfg.n_routed_experts + s.cfg.n_shared_experts for s in specs] == [8, 16, 64]
    assert all(s.cfg.n_activated_experts + s.cfg.n_shared_experts == 8 for s in specs)
    totals = {(s.cfg.n_routed_experts + s.cfg.n_shared_experts) * s.cfg.expert_inter_dim for s in specs}
    assert len(totals) == 1
    # the fine design is Table 4's 2:1 row and the routing table's top-6 row, so --reuse can share their runs
    from moemla.experiments.routing import routing_specs
    from moemla.experiments.tables import table4_specs

    two_to_one = next(s.cfg for s in table4_specs({"tiny": base}, [0]) if s.name == "2:1")
    top6 = next(s.cfg for s in routing_specs({"tiny": base}, [0]) if s.name == "top-6")
    assert specs[-1].cfg == two_to_one == top6


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


def test_table3_is_flop_matched_and_measures_decode_speed(data: Path, tmp_path: Path) -> None:
    result = reproduce("table3", "debug", steps=2, seeds=(0,), data=data, out=tmp_path / "t3", log=lambda _: None)
    rows = {r["name"]: r for r in result["summary"]}
    assert list(rows) == ["mha", "mla-rope", "moe-mha", "moe-mla-rope", "moe-mla-drope", "mha-rope"]
    assert abs(rows["mha-rope"]["flops_ratio"] - 1) <= 0.02  # our control keeps MHA's shape, and so its FLOPs
    assert any(c.text.startswith("(our control") and "same RoPE and FLOPs" in c.text for c in result["claims"])
    assert all(abs(rows[n]["flops_ratio"] - 1) <= 0.02 for n in ("moe-mha", "moe-mla-rope", "moe-mla-drope"))
    assert rows["mha"]["decode_speedup_vs_mha"] == 1.0
    assert all(r["decode_tokens_per_s"] > 0 for r in rows.values())
    assert "| moe-mla-rope |" in result["markdown"] and "7.012 | 0.99x | 3.2x" in result["markdown"]
    verdicts = {c.text.split(" (")[0]: c.verdict for c in result["claims"]}
    assert "MoE-MLA-RoPE decodes 3.2x faster than MHA" in verdicts


def test_table7_over_two_sizes_with_intervals_and_summary(data: Path, tmp_path: Path) -> None:
    result = reproduce("table7", "tiny", steps=2, seeds=(0,), data=data, out=tmp_path / "t7", log=lambda _: None)
    assert [r["name"] for r in result["summary"]] == [
        "debug/mha",
        "debug/moe-mla-rope",
        "tiny/mha",
        "tiny/moe-mla-rope",
    ]
    md = result["markdown"]
    assert "| debug |" in md and "| tiny |" in md and "1 seed: validation batches only" in md
    assert (tmp_path / "t7" / "scaling.png").is_file()
    (claim,) = [c for c in result["claims"] if "grows with model size" in c.text]
    assert claim.verdict in {"holds", "does not hold"} and "debug" in claim.ours
    # the summary over a results folder names every claim, measured or not, with what would measure it
    text = summarize(tmp_path)
    assert "grows with model size" in text and "run `moemla reproduce table2`" in text
    assert (tmp_path / "summary.md").read_text() == text


def test_relative_improvement_interval_over_seeds() -> None:
    mha = {"val_ppl_mean": 10.0, "val_ppl_by_seed": [10.0, 10.2, 9.8]}
    moe = {"val_ppl_mean": 9.0, "val_ppl_by_seed": [9.0, 9.18, 8.82]}  # exactly -10% on every seed
    rel, half, how = relative_improvement(moe, mha)
    assert rel == pytest.approx(-0.1) and half == pytest.approx(0, abs=1e-12) and "3 seeds" in how


def test_claim_verdict_rules() -> None:
    mha = {"val_ppl_mean": 10.0, "val_loss_mean": 2.30, "val_ppl_by_seed": [10.0], "seeds": 1}
    better = {"val_ppl_mean": 8.7, "val_loss_mean": 2.16, "val_ppl_by_seed": [8.7], "seeds": 1}
    slightly = {"val_ppl_mean": 9.9, "val_loss_mean": 2.29, "val_ppl_by_seed": [9.9], "seeds": 1}
    worse = {"val_ppl_mean": 10.5, "val_loss_mean": 2.35, "val_ppl_by_seed": [10.5], "seeds": 1}
    assert _quality("x", 0.135, better, mha, False).verdict == "holds"
    assert _quality("x", 0.135, slightly, mha, False).verdict == "partly holds"
    assert _quality("x", 0.135, worse, mha, False).verdict == "does not hold"


def _row(name: str, ppl: list[float], **extra: object) -> dict[str, object]:
    return {"name": name, "val_ppl_mean": sum(ppl) / len(ppl), "val_ppl_by_seed": ppl, "seeds": len(ppl), **extra}


@pytest.mark.parametrize("seeds", [1, 3])
def test_every_quality_claim_gets_a_paired_test_with_seeds(seeds: int) -> None:
    """Synergy, the compression knee, granularity and scaling: each tested per seed once there are 2+ seeds, and
    "holds" needs p < 0.05; a consistent effect holds, noise around the paper's direction only partly holds."""
    from moemla.experiments.claims import _compression_claims, _granularity_claims, _scaling_claims, _synergy

    def rows(spec: dict[str, float], noise: list[float]) -> dict[str, dict[str, object]]:
        # each row's own share of the seed-to-seed spread, so that per-seed differences vary a little
        return {n: _row(n, [v * (1 + e * (1 + i / 2)) for e in noise[:seeds]]) for i, (n, v) in enumerate(spec.items())}

    steady = [0.0, 0.004, -0.004]
    t2 = {"mha": 10.0, "mla": 10.5, "moe-mha": 12.0, "moe-mla-rope": 8.0}
    synergy = _synergy(rows(t2, steady))
    assert synergy.verdict == "holds" and synergy.seeds == seeds
    assert ("p = " in synergy.ours) == (seeds > 1) and ("no test" in synergy.ours) == (seeds == 1)
    t4 = {"1:1": 10.0, "2:1": 10.05, "4:1": 11.0, "8:1": 12.0}
    (knee,) = _compression_claims(rows(t4, steady))
    assert knee.verdict == "holds" and knee.seeds == seeds and ("4:1 vs 2:1: p =" in knee.ours) == (seeds > 1)
    t5 = {"coarse": 11.0, "standard": 10.5, "fine": 10.0}
    (fine,) = _granularity_claims(rows(t5, steady))
    assert fine.verdict == "holds" and ("fine vs coarse, standard: p =" in fine.ours) == (seeds > 1)
    # the same effects when seeds disagree on one row: the direction still matches, the test does not back it
    check = {"mla": (t2, lambda r: _synergy(r)), "4:1": (t4, lambda r: _compression_claims(r)[0]),
             "fine": (t5, lambda r: _granularity_claims(r)[0])}  # fmt: skip
    for row, (spec, claim) in check.items():
        mixed = rows(spec, steady) | rows({row: spec[row]}, [0.0, 0.25, -0.25])
        assert claim(mixed).verdict == ("partly holds" if seeds > 1 else "holds"), row
    t7 = {}
    for size, (mha, moe) in {"debug": (20.0, 18.0), "tiny": (10.0, 8.5), "xs": (8.0, 6.4)}.items():
        for name, v in (("mha", mha), ("moe-mla-rope", moe)):
            spread = steady[:seeds] if name == "mha" else [e / 2 for e in steady[:seeds]]
            t7[f"{size}/{name}"] = _row(name, [v * (1 + e) for e in spread], preset=size, val_ppl_ci95=None)
    (grows,) = _scaling_claims(t7)
    assert grows.verdict == "holds" and grows.seeds == seeds and ("each step: p =" in grows.ours) == (seeds > 1)
    t7["xs/moe-mla-rope"] = _row(
        "moe-mla-rope", [7.0 * (1 + e) for e in steady[:seeds]], preset="xs", val_ppl_ci95=None
    )
    assert _scaling_claims(t7)[0].verdict == "does not hold"  # xs gains 12.5% < tiny's 15%


def test_reproduce_rejects_bad_presets(data: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown size preset"):
        reproduce("table2", "huge", steps=1, data=data, out=tmp_path)
    with pytest.raises(ConfigError, match="only table7"):
        reproduce("table2", "debug,tiny", steps=1, data=data, out=tmp_path)


def test_plan_measures_every_run_and_trains_nothing_then_batch_and_seq_len_reach_the_runs(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--plan prints each run's tokens and a time measured by a few real steps on this device, with a warning when
    the CPU was busy as it probed; --batch-size and --seq-len shape the sweep (recorded in results.json and the
    command)."""
    from moemla.cli import main
    from moemla.experiments import plan

    monkeypatch.setattr(plan, "cpu_load", lambda: 64.0)  # as if other jobs held every core

    out = tmp_path / "t4"
    flags = ["--preset", "debug", "--steps", "3", "--data", str(data), "--out", str(out), "--batch-size", "4",
             "--seq-len", "48", "--device", "cpu"]  # fmt: skip
    assert main(["reproduce", "table4", *flags, "--plan"]) == 0
    text = capsys.readouterr().out
    runs = [line for line in text.splitlines() if line.startswith("| ") and "seed0" in line]
    assert len(runs) == 4 and all("| 3 | 576 |" in line for line in runs)  # 3 steps x 4 x 48 tokens
    assert "To train: 4 of 4 runs" in text and not (out / "runs").exists()
    assert "The CPU was busy when the probes ran (load average 64.0" in text
    monkeypatch.setattr(plan, "cpu_load", lambda: 0.0)
    assert main(["reproduce", "table4", *flags]) == 0
    result = json.loads((out / "results.json").read_text())
    assert (result["train"]["batch_size"], result["train"]["seq_len"]) == (4, 48)
    assert "--batch-size 4 --seq-len 48" in result["command"]
    capsys.readouterr()
    assert main(["reproduce", "table4", *flags, "--plan"]) == 0
    text = capsys.readouterr().out
    assert "To train: 0 of 4 runs" in text and "busy" not in text  # finished runs are not planned again


def test_rows_run_a_subset_of_a_table_and_the_rope_control_gets_its_p_value(data: Path, tmp_path: Path) -> None:
    rows = ("mha", "mha-rope", "moe-mla-rope")
    result = reproduce("table2", "debug", steps=2, seeds=(0, 1), data=data, out=tmp_path / "c", log=lambda _: None,
                       rows=rows)  # fmt: skip
    assert {r["name"] for r in result["summary"]} == set(rows)
    control = [c for c in result["claims"] if "same RoPE (mha-rope)" in c.text]
    assert len(control) == 1 and "p = " in control[0].ours and "over 2 seeds" in control[0].ours
    with pytest.raises(ValueError, match=r"has no row\(s\) \['gqa'\]"):
        reproduce("table2", "debug", steps=2, data=data, out=tmp_path / "d", rows=("mha", "gqa"))


def test_rows_without_the_base_row_still_write_the_report(data: Path, tmp_path: Path) -> None:
    """Splitting a table by --rows across processes leaves a report without its reference row (MHA, top-6, 1:1, a
    size's pair): it is written with "-" where the comparison would be, not a crash after the training."""
    for table in ("table2", "table3"):
        result = reproduce(table, "debug", steps=2, seeds=(0,), data=data, out=tmp_path / table, log=lambda _: None,
                           rows=("mha-rope",))  # fmt: skip
        (line,) = [x for x in result["markdown"].splitlines() if x.startswith("| mha-rope |")]
        assert "| - | - |" in line and "decode_speedup_vs_mha" not in result["summary"][0]
        assert (tmp_path / table / f"{table}.md").is_file()
    t4 = reproduce("table4", "debug", steps=2, seeds=(0,), data=data, out=tmp_path / "t4", log=lambda _: None,
                   rows=("2:1",))  # fmt: skip
    (line,) = [x for x in t4["markdown"].splitlines() if x.startswith("| 2:1 |")]
    assert line.endswith("| - | 50.0% |") and not (tmp_path / "t4" / "tradeoff.png").exists()
    t7 = reproduce("table7", "debug", steps=2, seeds=(0,), data=data, out=tmp_path / "t7", log=lambda _: None,
                   rows=("debug/moe-mla-rope",))  # fmt: skip
    assert "| debug |" not in t7["markdown"] and not (tmp_path / "t7" / "scaling.png").exists()
    assert (tmp_path / "t7" / "table7.md").is_file()


def _table2_result(
    folder: str, data: str, ppl: dict[str, list[float]], rows: list[str] | None = None, preset: str = "tiny"
) -> dict:
    """A results.json of table2 as the sweep writes it, from per-seed perplexities (bits per byte from them)."""
    import math

    from moemla.experiments.sweep import aggregate

    runs = [
        {"name": name, "seed": seed, "val_ppl": p, "val_loss": math.log(p), "bits_per_byte": math.log2(p) / 4,
         "expert_load_cv": [0.05] if name.startswith("moe") else None, "train_seconds": 60.0,
         "active_params": 0.6 if name.startswith("moe") else 1.0, "kv_cache_bytes_per_token": 2 if "mla" in name else 4}
        for name, values in ppl.items() for seed, p in enumerate(values)
    ]  # fmt: skip
    res = {"table": "table2", "presets": [preset], "data": data, "folder": folder, "runs": runs,
           "summary": aggregate(runs), "train": {}}  # fmt: skip
    return {**res, "rows": rows} if rows else res


def test_summary_takes_each_claim_from_the_table_with_most_seeds_per_corpus() -> None:
    """A full table of one seed and the RoPE control of three seeds on one corpus: the claims the control also
    tests come from it with p-values; the rest (synergy) from the full table; another corpus stays apart."""
    from moemla.experiments import summary

    one = {v: [10.0] for v in ("mha", "mla", "moe-mha", "mha-rope")} | {"moe-mla-rope": [8.0]}
    control = {"mha": [10.0, 10.2, 9.9], "mha-rope": [8.0, 8.1, 7.9], "moe-mla-rope": [8.2, 8.35, 8.1]}
    full = _table2_result("t2", "data/builtin", one)
    ctrl = _table2_result("t2-control", "data/builtin", control, rows=list(control))
    other = _table2_result("t2-code", "data/stdlib", {"mha": [5.0, 5.1], "moe-mla-rope": [4.0, 4.2]})
    by = {c.text.split(" (")[0]: c for c in summary.best_claims([full, ctrl])}
    quality = by["parameter-matched: MoE-MLA-RoPE improves perplexity over MHA"]
    assert quality.source == "t2-control" and quality.seeds == 3 and "p = " in quality.ours
    assert quality.verdict == "holds"
    rope = next(c for t, c in by.items() if t.startswith("(our control"))
    assert rope.source == "t2-control" and rope.verdict == "does not hold" and "over 3 seeds" in rope.ours
    assert by["MoE and MLA are synergistic: the combination beats the sum of MLA alone and MoE alone"].source == "t2"
    assert by["the gain over MHA grows with model size"].verdict == "not measured"
    text = summary.markdown(summary.ordered({"stdlib": [other], "builtin": [full, ctrl]}))
    assert text.index("## On the built-in corpus") < text.index("## On Python's standard library")
    bpb = text.split("## Bits per byte")[1].split("##")[0]
    assert "| table2 | tiny | mha | 0.8317 ± " in bpb and "(3 seeds) | 0.5841 ± " in bpb  # mean log2(ppl)/4; stdlib
    assert "| table2 | tiny | mla | 0.8305 (1 seed) | - |" in bpb
    assert "| t2-control | the built-in corpus | tiny | 9 | 3 | 9 min |" in text


def test_summary_keeps_each_size_apart() -> None:
    """A Table 2 at xs beside one at tiny on the same corpus: each claim once per size, smaller first, and its
    bits per byte in rows of its own size, never pooled with or replacing the tiny rows."""
    from moemla.experiments import summary

    tiny = _table2_result("t2-tiny", "data/builtin", {"mha": [10.0, 10.2, 9.9], "moe-mla-rope": [8.0, 8.1, 7.9]})
    xs = _table2_result("t2-xs", "data/builtin", {"mha": [9.0] * 4, "moe-mla-rope": [9.5, 9.4, 9.6, 9.5]}, preset="xs")
    matched = "parameter-matched: MoE-MLA-RoPE improves p"
    got = [(c.size, c.source, c.verdict) for c in summary.best_claims([xs, tiny]) if c.text.startswith(matched)]
    assert got == [("tiny", "t2-tiny", "holds"), ("xs", "t2-xs", "does not hold")]
    text = summary.markdown({"builtin": [tiny, xs]})
    assert "| table2 | tiny | mha | 0.8317 ± " in text and "| table2 | xs | mha | 0.7925 ± " in text
    assert "| t2-xs | the built-in corpus | xs | 8 | 4 |" in text


def test_routing_table_measures_active_experts_of_top_k_and_top_p(data: Path, tmp_path: Path) -> None:
    """§7 question 3: top-k rows route exactly k experts per token; top-p rows a measured mean between 1 and 8."""
    result = reproduce("routing", "debug", steps=2, seeds=(0, 1), data=data, out=tmp_path / "r", log=lambda _: None)
    rows = {r["name"]: r for r in result["summary"]}
    assert list(rows) == ["top-2", "top-4", "top-6", "top-8", "top-p=0.5", "top-p=0.7", "top-p=0.9"]
    assert [rows[f"top-{k}"]["active_experts_mean"] for k in (2, 4, 6, 8)] == [2.0, 4.0, 6.0, 8.0]
    dynamic = [rows[f"top-p={p}"]["active_experts_mean"] for p in ("0.5", "0.7", "0.9")]
    assert all(1 <= a <= 8 for a in dynamic) and dynamic == sorted(dynamic)  # more mass kept, more experts
    assert len({r["total_params"] for r in rows.values()}) == 1
    md = result["markdown"]
    assert "| top-6 | 6 | 6.00 |" in md and "| +0.0% | - | - | - |" in md
    assert all(line.split("|")[10].strip() in {"yes", "no"} for line in md.splitlines() if line.startswith("| top-p"))
    assert all(line.split("|")[8].strip() != "-" for line in md.splitlines() if line.startswith("| top-p"))
    # 2 seeds: each top-p row is tested against its own seeds' curves (nan where 2 steps leave no spread)
    assert all(line.split("|")[11].strip() != "-" for line in md.splitlines() if line.startswith("| top-p"))


def test_routing_tests_each_top_p_seed_against_its_own_seeds_top_k_curve() -> None:
    """The curve test is paired by seed: a top-p row sitting 0.03 PPL (about 1%, give or take 0.005) under each
    seed's own top-k curve is significant even where the seeds' curves lie 0.9 PPL apart; one seed gives "-"."""
    from moemla.experiments.routing import routing_markdown

    def row(name: str, experts: list[float], ppl: list[float]) -> dict[str, object]:
        return {"name": name, "max_experts": 8, "flops_one": 1e6, "flops_per_expert": 1e5, "seeds": len(ppl),
                "val_ppl_by_seed": ppl, "val_ppl_mean": sum(ppl) / len(ppl), "val_ppl_std": 0.1,
                "active_experts_by_seed": experts, "active_experts_mean": sum(experts) / len(experts)}  # fmt: skip

    spread, jitter = [0.0, 0.5, -0.4], [0.0, 0.005, -0.004]  # seeds' curves 0.9 apart, top-p 0.03 under each
    slope = [-0.05, -0.048, -0.053]  # each seed's curve is linear in k, so interpolation is exact
    fixed = [
        row(f"top-{k}", [k] * 3, [3.0 + s * k + o for s, o in zip(slope, spread, strict=True)]) for k in (2, 4, 6, 8)
    ]
    experts = [3.0, 3.2, 2.8]
    under = [3.0 + s * e + o - 0.03 + j for s, e, o, j in zip(slope, experts, spread, jitter, strict=True)]
    dyn = row("top-p=0.5", experts, under)
    md = routing_markdown([*fixed, dyn])
    (line,) = [ln for ln in md.splitlines() if ln.startswith("| top-p=0.5")]
    assert line.split("|")[10].strip() == "yes" and float(line.split("|")[11]) < 0.05
    one_seed = routing_markdown([row(r["name"], r["active_experts_by_seed"][:1], r["val_ppl_by_seed"][:1])  # type: ignore[index]
                                 for r in [*fixed, dyn]])  # fmt: skip
    assert one_seed.splitlines()[-3].split("|")[11].strip() == "-"


def test_a_subset_of_rows_leaves_what_it_cannot_compare_not_measured() -> None:
    """`reproduce --rows` may train any subset: a table without the rows a claim compares reports that claim
    "not measured" (with the command that measures it) instead of failing after hours of training."""
    from moemla.experiments import claims

    def table(names: list[str], **extra: object) -> dict[str, object]:
        return {"summary": [_row(n, [10.0, 9.9], **extra) for n in names]}

    partial = {
        "table2": table(["mha"]),
        "table3": table(["moe-mla-rope", "mha-rope"]),
        "table4": table(["1:1", "2:1"]),
        "table5": table(["fine"]),
        "table7": {"summary": [_row("mha", [9.0, 9.1], preset="debug", val_ppl_ci95=None) | {"name": "debug/mha"}]},
    }
    for name, res in partial.items():
        measured = [c for c in claims.check({name: res}) if c.verdict != "not measured" and "CV" not in c.text]
        assert measured == [], (name, measured)
    listed = claims.markdown(claims.check(partial), "subsets")
    assert "run `moemla reproduce table2`" in listed and "run `moemla reproduce table4`" in listed


def test_reuse_copies_identical_runs_from_another_table_and_trains_only_the_rest(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Table 7's rows at one size are Table 2's mha and moe-mla-rope: --reuse copies those finished runs (same
    model, settings, seed and data, as the sweep's own check says) and trains only what no folder holds."""
    from moemla.cli import main

    t2 = tmp_path / "t2"
    reproduce("table2", "debug", steps=2, seeds=(0,), data=data, out=t2, rows=("mha", "moe-mla-rope"),
              log=lambda _: None)  # fmt: skip
    flags = ["--preset", "debug", "--steps", "2", "--seeds", "0,1", "--data", str(data), "--out", str(tmp_path / "t7"),
             "--device", "cpu", "--reuse", str(t2)]  # fmt: skip
    assert main(["reproduce", "table7", *flags, "--plan"]) == 0
    text = capsys.readouterr().out
    assert text.count("copied from t2") == 2 and "To train: 2 of 4 runs" in text  # seed 1 is in no folder
    log: list[str] = []
    result = reproduce("table7", "debug", steps=2, seeds=(0, 1), data=data, out=tmp_path / "t7", log=log.append,
                       reuse=(t2,))  # fmt: skip
    assert sum("copied from" in line for line in log) == 2
    assert sum(line.startswith("run ") and line.endswith(("-seed1",)) for line in log) == 2  # trained here
    old = {r["name"]: r["val_loss"] for r in json.loads((t2 / "results.json").read_text())["runs"]}
    new = {r["name"].split("/")[1]: r["val_loss"] for r in result["summary"] if r["seeds"]}
    for name in ("mha", "moe-mla-rope"):
        seed0 = [r for r in json.loads((tmp_path / "t7" / "results.json").read_text())["runs"]
                 if r["name"] == f"debug/{name}" and r["seed"] == 0]  # fmt: skip
        assert seed0[0]["val_loss"] == old[name] and name in new
    assert not list((tmp_path / "t7" / "runs").glob("*.copying"))
    t7_runs = json.loads((tmp_path / "t7" / "results.json").read_text())["runs"]
    copied = {(r["name"], r["seed"]): r["copied_from"] for r in t7_runs}
    assert [k for k, v in copied.items() if v] == [("debug/mha", 0), ("debug/moe-mla-rope", 0)]
    # the summary's time table counts a copied run's time where it was trained, not twice
    text = summarize(tmp_path)
    assert "| t7 | the built-in corpus | debug | 4 | 2 |" in text and "(+ 2 runs copied)" in text
    t2_line = "| t2 | the built-in corpus | debug | 2 | 1 |"
    assert t2_line in text and f"{t2_line} 0 min (+" not in text
    # and names the device that trained them, as the runs recorded it, not the --device asked for
    assert re.search(r"\| t2 \| the built-in corpus \| debug \| 2 \| 1 \| \d+ min \| cpu, \d+ threads? \|", text)
    assert re.search(r"\(data: `[^`]+`; trained on cpu, \d+ threads?\)", (tmp_path / "t7" / "table7.md").read_text())
    # the same tokenizer over other text is other data: neither reused in place nor copied
    meta_path = t2 / "runs" / "mha-seed0" / "run.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "data": {**meta["data"], "sha256": "0" * 64}}))
    with pytest.raises(ConfigError, match=r"data: .* there"):
        reproduce("table2", "debug", steps=2, seeds=(0,), data=data, out=t2, rows=("mha",), log=lambda _: None)
    capsys.readouterr()
    assert main(["reproduce", "table7", *flags, "--plan", "--out", str(tmp_path / "t7d")]) == 0
    assert capsys.readouterr().out.count("copied from t2") == 1  # moe-mla-rope only
    with pytest.raises(ConfigError, match="--reuse: no folder"):
        reproduce("table7", "debug", steps=2, data=data, out=tmp_path / "t7c", reuse=(tmp_path / "nowhere",))


def test_busy_note_warns_only_when_other_work_held_more_than_half_the_cores() -> None:
    from moemla.experiments.plan import busy_note

    assert busy_note(None, 2) is None  # no load average on this OS: nothing to say
    assert busy_note(0.4, 2) is None and busy_note(1.0, 2) is None
    assert "load average 2.5 on 2 cores" in busy_note(2.5, 2)  # type: ignore[operator]
    assert busy_note(6.0, 16) is None


def test_train_device_names_each_machine_a_resumed_run_trained_on() -> None:
    from moemla.experiments.sweep import train_device

    def rec(step: int, device: str | None) -> dict:
        return {"step": step, "split": "train", "elapsed_s": step} | ({"device": device} if device else {})

    assert train_device([rec(10, None), {"step": 10, "split": "val"}]) is None  # recorded before devices were
    assert train_device([rec(10, "cpu, 2 threads"), rec(20, "cpu, 2 threads")]) == "cpu, 2 threads"
    moved = [rec(10, "cpu, 2 threads"), rec(20, "NVIDIA H200"), rec(30, "NVIDIA H200")]
    assert train_device(moved) == "cpu, 2 threads then NVIDIA H200"


def test_a_duplicated_seed_is_refused_and_a_results_folder_listing_a_run_twice_reports_no_p_value(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--seeds 0,0` once trained one run, counted it twice and reported p = 0 over 2 seeds. The parser refuses
    it (and negative or huge seeds, and 0 for a size) before any folder exists; a results.json written that way
    is summarized over its distinct runs, so no p-value comes from copies of one run."""
    from moemla.cli import main
    from moemla.experiments.sweep import aggregate

    refusals = [(["--seeds", "0,0"], "seed 0 is given twice"), (["--seeds", "-1"], "[0, 2^63)"),
                (["--seeds", str(2**63)], "[0, 2^63)"), (["--batch-size", "0"], "--batch-size: must be"),
                (["--seq-len", "0"], "--seq-len: must be"), (["--steps", "0"], "--steps: must be")]  # fmt: skip
    for flags, message in refusals:
        with pytest.raises(SystemExit):
            main(["reproduce", "table2", "--out", str(tmp_path / "t2"), "--plan", *flags])
        assert message in capsys.readouterr().err
    assert not (tmp_path / "t2").exists()
    # an old results folder: every run listed twice (one seed), its stored summary averaged over the copies
    res = _table2_result("t2", "data/builtin", {"mha": [10.0], "moe-mla-rope": [8.0]})
    res["runs"] = [{**r, "run": str(tmp_path / "gone")} for r in res["runs"] for _ in range(2)]
    old = aggregate(res["runs"])
    for row in old:
        row.update(seeds=2, val_ppl_by_seed=row["val_ppl_by_seed"] * 2, val_ppl_std=0.0)  # as the old code wrote it
    res["summary"] = old
    (tmp_path / "t2").mkdir()
    (tmp_path / "t2" / "results.json").write_text(json.dumps(res))
    text = summarize(tmp_path)
    quality = next(line for line in text.splitlines() if "improves perplexity over MHA" in line)
    assert "p = " not in quality and "2 seeds" not in quality
    assert [r["seeds"] for r in aggregate(res["runs"])] == [1, 1]
