"""Two commits of moemla side by side: `moemla bench` rows of each, interleaved run by run on the same machine.

    python benchmarks/before_after.py 1afbc08 HEAD --presets tiny,xs --variants mha,moe-mla-drope \
        --engines torch,numba,onnx --repeats 2

Each commit is checked out once into a temporary git worktree; every row runs `python -m moemla bench --json` in a
fresh process with that worktree's `src/` first on the import path (the installed dependencies are shared), the
two commits alternating row by row so that drifting machine load falls on both alike. Each row is the best of
`--repeats` such runs. Prints a Markdown table of decode and prefill tokens/s with the after/before ratios, then
one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def worktree(commit: str, into: Path) -> Path:
    path = into / commit.replace("/", "_")
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), commit], check=True,
                   capture_output=True)  # fmt: skip
    return path


def bench_row(tree: Path, preset: str, variant: str, engine: str, batch: int, context: int, new: int) -> dict | None:
    argv = [sys.executable, "-m", "moemla", "bench", "--preset", preset, "--variants", variant, "--engine", engine,
            "--batch", str(batch), "--context", str(context), "--new-tokens", str(new), "--json"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tree)
    if done.returncode != 0:
        print(f"{tree.name} {preset} {variant} {engine}: {(done.stderr.strip().splitlines() or ['?'])[-1]}",
              file=sys.stderr)  # fmt: skip
        return None
    return json.loads(done.stdout)[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("before")
    p.add_argument("after")
    p.add_argument("--presets", default="tiny,xs")
    p.add_argument("--variants", default="mha,moe-mla-drope")
    p.add_argument("--engines", default="torch,numba,onnx")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from moemla.config import ModelConfig
    from moemla.device import cpu_name

    rows = []
    with tempfile.TemporaryDirectory(prefix="moemla-before-after-") as tmp:
        trees = {name: worktree(name, Path(tmp)) for name in (args.before, args.after)}
        try:
            for preset in args.presets.split(","):
                context = ModelConfig.from_preset(preset).max_seq_len
                for variant in args.variants.split(","):
                    for engine in args.engines.split(","):
                        best: dict[str, dict] = {}
                        for _ in range(args.repeats):
                            for name, tree in trees.items():  # alternating: load drift falls on both
                                r = bench_row(tree, preset, variant, engine, args.batch, context, args.new_tokens)
                                if r and r["decode_tokens_per_s"] > best.get(name, {}).get("decode_tokens_per_s", 0):
                                    best[name] = r
                        if len(best) == 2:
                            b, a = best[args.before], best[args.after]
                            rows.append({"preset": preset, "variant": variant, "engine": engine, "before": b,
                                         "after": a})  # fmt: skip
                            print(f"{preset} {variant} {engine}: decode {b['decode_tokens_per_s']:.0f} -> "
                                  f"{a['decode_tokens_per_s']:.0f} tok/s", file=sys.stderr, flush=True)  # fmt: skip
        finally:
            for tree in trees.values():
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                               capture_output=True)  # fmt: skip
    print(f"CPU: {cpu_name()}; {args.before} -> {args.after}; batch {args.batch}, best of {args.repeats}")
    print(
        "| preset | variant | engine | decode before | decode after | after/before | prefill before | prefill after |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        b, a = r["before"], r["after"]
        print(f"| {r['preset']} | {r['variant']} | {r['engine']} | {b['decode_tokens_per_s']:,.1f} | "
              f"{a['decode_tokens_per_s']:,.1f} | {a['decode_tokens_per_s'] / b['decode_tokens_per_s']:.2f}x | "
              f"{b['prefill_tokens_per_s']:,.0f} | {a['prefill_tokens_per_s']:,.0f} |")  # fmt: skip
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
