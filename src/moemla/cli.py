"""The `moemla` command: thin argument parsing over the library."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from collections.abc import Callable, Sequence

from moemla import accounting
from moemla.config import SIZES, VARIANTS, ConfigError, ModelConfig


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _field_parser(annotation: object) -> tuple[Callable[[str], object], list[str] | None]:
    """How to parse one ModelConfig field from text: (converter, choices)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return str, list(args)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):  # `int | None`
        inner = next(a for a in args if a is not type(None))
        convert = _field_parser(inner)[0]
        return (lambda s: None if s.lower() == "none" else convert(s)), None
    if annotation is bool:
        return _parse_bool, None
    return typing.cast(Callable[[str], object], annotation), None


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One `--field-name` flag per ModelConfig field; unset flags leave the preset's value."""
    group = parser.add_argument_group("model config overrides (default: the preset's value)")
    hints = typing.get_type_hints(ModelConfig)
    for f in dataclasses.fields(ModelConfig):
        convert, choices = _field_parser(hints[f.name])
        group.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f"cfg_{f.name}",
            type=convert,
            choices=choices,
            default=None,
            metavar=None if choices else f.name.upper(),
            help=f"ModelConfig.{f.name} (dataclass default {f.default!r}; presets may set it)",
        )


def config_overrides(args: argparse.Namespace) -> dict[str, object]:
    return {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}


def _human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _print_table(rows: list[dict[str, object]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{rows[0]['n_layers']} layers, d={rows[0]['dim']}, vocab {rows[0]['vocab_size']}")
    table.add_column("variant", no_wrap=True)
    for name in ("params", "active", "FLOPs/token", "KV bytes/token", "KV vs mha"):
        table.add_column(name, justify="right", no_wrap=True)
    mha_kv = next((r["kv_cache_bytes_per_token"] for r in rows if r["attention"] == "mha"), None)
    for r in rows:
        kv = typing.cast(int, r["kv_cache_bytes_per_token"])
        ratio = f"{kv / mha_kv:.0%}" if mha_kv else "-"
        table.add_row(
            str(r["variant"] or "custom"),
            _human(typing.cast(int, r["total_params"])),
            _human(typing.cast(int, r["active_params"])),
            _human(typing.cast(int, r["flops_per_token"])),
            f"{kv:,}",
            ratio,
        )
    Console().print(table)
    print(f"FLOPs per token at context {rows[0]['flops_context']}; KV cache in {rows[0]['kv_cache_dtype']}.")


def cmd_info(args: argparse.Namespace) -> int:
    overrides = config_overrides(args)
    variants = list(VARIANTS) if args.all_variants else [args.variant]
    configs = [ModelConfig.from_preset(args.preset, v, **overrides) for v in variants]
    rows = [accounting.summary(cfg, args.context, args.dtype) for cfg in configs]
    if args.json:
        print(json.dumps(rows if args.all_variants else rows[0]))
    else:
        _print_table(rows)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moemla", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = sub.add_parser(
        "info",
        help="parameters, active parameters, FLOPs and KV-cache bytes per token of a configuration",
        description="Closed-form accounting of a model configuration (no model is built).",
    )
    info.add_argument("--preset", default="xs", choices=list(SIZES), help="size preset (Table 1, plus tiny and debug)")
    info.add_argument("--variant", default="moe-mla-rope", choices=list(VARIANTS), help="architecture variant")
    info.add_argument("--all-variants", action="store_true", help="compare all variants side by side")
    info.add_argument("--context", type=int, default=None, help="context length for FLOPs (default max_seq_len)")
    info.add_argument(
        "--dtype", default="float32", choices=sorted(accounting.DTYPE_BYTES), help="KV-cache element type"
    )
    info.add_argument("--json", action="store_true", help="print JSON (one object, or a list with --all-variants)")
    add_config_flags(info)
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"moemla {args.command}: invalid configuration: {err}", file=sys.stderr)
        return 2
