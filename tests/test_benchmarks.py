"""The benchmark scripts stay runnable: each parses its flags, and the MoE-layer one runs end to end at a tiny
size. (Their numbers belong in BENCHMARKS.md, never in tests.)"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted((ROOT / "benchmarks").glob("*.py"))


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([*argv], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_benchmark_script_explains_itself(script: Path) -> None:
    out = _run(sys.executable, str(script), "--help")
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout


def test_moe_layer_benchmark_measures_every_candidate_on_a_tiny_layer() -> None:
    argv = ["--sizes", "debug", "--batch", "2", "--seq", "16", "--repeats", "1"]
    out = _run(sys.executable, "benchmarks/moe_layer.py", *argv, "--candidates", "grouped,scatter,naive,dense")
    assert out.returncode == 0, out.stderr
    (row,) = json.loads(out.stdout.strip().splitlines()[-1])["rows"]
    assert all(row[f"{c}_ms"] > 0 for c in ("grouped", "scatter", "naive", "dense"))
    bad = _run(sys.executable, "benchmarks/moe_layer.py", "--candidates", "grouped,fast")
    assert bad.returncode == 2 and "unknown candidates ['fast']" in bad.stderr


def test_gpu_pending_lists_its_measurements_and_refuses_unknown_ones() -> None:
    listed = _run("bash", "benchmarks/gpu_pending.sh", "--list")
    assert listed.returncode == 0
    names = [line.split(":")[0] for line in listed.stdout.splitlines()]
    assert {"decode-eager", "decode-compiled-graph", "train-throughput", "moe-layer"} <= set(names)
    assert all("--device cuda" in line for line in listed.stdout.splitlines() if "bench" in line)
    unknown = _run("bash", "benchmarks/gpu_pending.sh", "decode-fast")
    assert unknown.returncode == 2 and "unknown measurement 'decode-fast'" in unknown.stderr
