"""The benchmark scripts stay runnable: each parses its flags, and the MoE-layer one runs end to end at a tiny
size. (Their numbers belong in BENCHMARKS.md, never in tests.)"""

import ast
import json
import re
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
    """--help shows the docstring's summary, and every flag of the docstring's example commands exists."""
    out = _run(sys.executable, str(script), "--help")
    assert out.returncode == 0, out.stderr
    doc = ast.get_docstring(ast.parse(script.read_text())) or ""
    assert doc and " ".join(doc.splitlines()[0].split()) in " ".join(out.stdout.split())
    examples = [line for line in doc.splitlines() if line.strip().startswith(f"python benchmarks/{script.name}")]
    assert examples, f"{script.name}'s docstring shows no command to run it"
    flags = {f for line in examples for f in re.findall(r"(--[a-z][a-z0-9-]*)", line)}
    missing = sorted(f for f in flags if not re.search(rf"{f}\b", out.stdout))
    assert not missing, f"{script.name}'s docstring uses flags its parser lacks: {missing}"


def test_moe_layer_benchmark_measures_every_candidate_on_a_tiny_layer() -> None:
    argv = ["--sizes", "debug", "--batch", "2", "--seq", "16", "--repeats", "1"]
    out = _run(sys.executable, "benchmarks/moe_layer.py", *argv, "--candidates", "grouped,scatter,naive,dense")
    assert out.returncode == 0, out.stderr
    (row,) = json.loads(out.stdout.strip().splitlines()[-1])["rows"]
    assert all(row[f"{c}_ms"] > 0 for c in ("grouped", "scatter", "naive", "dense"))
    bad = _run(sys.executable, "benchmarks/moe_layer.py", "--candidates", "grouped,fast")
    assert bad.returncode == 2 and "unknown candidates ['fast']" in bad.stderr


def test_train_throughput_benchmark_runs_every_variant_on_a_tiny_model() -> None:
    """The overhead table of EXPERIMENTS.md (issue 23, question 1) comes from this script: it must run."""
    argv = ["--cases", "debug:256", "--variants", "mha,moe-mla-rope,mla", "--batch", "2", "--seq", "16"]
    out = _run(sys.executable, "benchmarks/train_throughput.py", *argv, "--repeats", "1")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout.strip().splitlines()[-1])["rows"]
    assert [r["variant"] for r in rows] == ["mha", "moe-mla-rope", "mla"] and rows[0]["tokens_vs_mha"] == 1.0
    assert all(r["step_ms"] > 0 for r in rows)


def test_gpu_pending_lists_its_measurements_and_refuses_unknown_ones() -> None:
    listed = _run("bash", "benchmarks/gpu_pending.sh", "--list")
    assert listed.returncode == 0
    names = [line.split(":")[0] for line in listed.stdout.splitlines()]
    assert {"decode-eager", "decode-compiled-graph", "train-throughput", "moe-layer"} <= set(names)
    assert all("--device cuda" in line for line in listed.stdout.splitlines() if "bench" in line)
    unknown = _run("bash", "benchmarks/gpu_pending.sh", "decode-fast")
    assert unknown.returncode == 2 and "unknown measurement 'decode-fast'" in unknown.stderr


def test_cpu_dropout_benchmark_times_all_three_paths_and_restores_ours() -> None:
    argv = ["--cases", "debug:256", "--variants", "mha", "--batch", "2", "--seq", "16", "--repeats", "1"]
    out = _run(sys.executable, "benchmarks/cpu_dropout.py", *argv)
    assert out.returncode == 0, out.stderr
    (row,) = json.loads(out.stdout.strip().splitlines()[-1])["rows"]
    assert all(row[f"{k}_s"] > 0 for k in ("ours", "torch", "no-dropout"))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import cpu_dropout
        import moemla.model.dropout as dropout

        before = dropout.fast
        with cpu_dropout.torch_dropout():
            assert not dropout.fast(None, 0.1, True)
        assert dropout.fast is before
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
