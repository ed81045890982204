"""Expert-load CV over steps for each balancing rule on a skewed synthetic router (moemla.experiments.balancing).

    python benchmarks/balancing.py [--steps 3000] [--tokens 512]

Prints a table for people, then one line of JSON for machines.
"""

from __future__ import annotations

import argparse
import json

from moemla.experiments.balancing import run_balancing, skewed_router

SETTINGS = [("paper", 1e-3), ("sign", 1e-3), ("paper", 1.0)]


def trajectory(rule: str, rate: float, tokens: int, report: list[int]) -> dict[int, float]:
    """Load CV at each step in `report`, running the balancing updates in between."""
    moe, x = skewed_router()
    moe.train()
    cvs, done = {}, 0
    for step in report:
        cvs[step] = run_balancing(moe, x[:tokens], step - done, rate, rule)
        done = step
    return cvs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--tokens", type=int, default=512, help="tokens routed per step (at most 2048)")
    args = parser.parse_args()
    report = sorted({1, 100, 1000, args.steps} & set(range(1, args.steps + 1)))
    rows = [{"rule": rule, "rate": rate, "cv": trajectory(rule, rate, args.tokens, report)} for rule, rate in SETTINGS]
    print(f"{'rule':<7}{'gamma':>8}" + "".join(f"{'step ' + str(s):>12}" for s in report))
    for r in rows:
        print(f"{r['rule']:<7}{r['rate']:>8g}" + "".join(f"{r['cv'][s]:>12.2f}" for s in report))
    print(json.dumps({"benchmark": "balancing", "rows": rows}))


if __name__ == "__main__":
    main()
