"""The `moemla` command: a thin package that parses flags and calls the library.

core: info, prepare, train, eval, demo; tools: generate, bench, reproduce, judge; ship: export, web, serve.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from moemla.cli import core, ship, tools
from moemla.config import ConfigError
from moemla.data.sources import DataError
from moemla.eval.judge import JudgeError
from moemla.runs.checkpoint import CheckpointError
from moemla.runs.folder import RunError
from moemla.train.loop import TrainingDiverged

# what a Ctrl-C loses, and how to go on, per command
INTERRUPTED = {
    "train": "; the run continues from its last checkpoint with the same command and --resume",
    "demo": "; run the same `moemla demo` again: it continues from the last checkpoints",
    "reproduce": "; run the same command again: finished runs are skipped, the others resume",
    "judge": "; run the same command again: completions and judgments so far are cached",
    "prepare": "; nothing was kept: run it again",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moemla",
        description="Train, evaluate, compare and benchmark small MoE-MLA-RoPE language models "
        "(arXiv 2508.01261). New here? Run `moemla demo`. Each command has its own --help.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    core.add_commands(sub)
    tools.add_commands(sub)
    ship.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "lm-eval":  # every flag after `lm-eval` is lm-eval's own
        args.args = rest + args.args
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"moemla {args.command}: invalid configuration: {err}", file=sys.stderr)
        return 2
    except (DataError, RunError, CheckpointError, TrainingDiverged, JudgeError, ValueError) as err:
        print(f"moemla {args.command}: error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # a read-only folder, a full disk: the file and the reason, not a traceback
        where = f" ({err.filename})" if err.filename else ""
        print(f"moemla {args.command}: error: {err.strerror or err}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:
        note = getattr(err, "note", None) or INTERRUPTED.get(args.command, "")  # training knows its checkpoint
        print(f"moemla {args.command}: interrupted{note}", file=sys.stderr)
        return 130
