"""Command-line flags derived from the config dataclasses: one `--field-name` per field, typed and checked."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable

from moemla.config import DEFAULT_VARIANT, ConfigError, ModelConfig

FLAVOR_HELP = (
    "the block: paper (LayerNorm, GELU, separate latents, softmax routing; the default) or deepseek (RMSNorm, "
    "SwiGLU, one joint latent, sigmoid routing, no biases: DeepSeek-V3's block; with moe-mla-drope it is "
    "DeepSeek-V3's architecture, with mha-rope Llama's)"
)


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1 (0 is refused like a negative, never read as "the default")."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def check_port(port: int) -> int:
    """The one rule for --port (`moemla serve`, `moemla web`): 0..65535, 0 picking any free port."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be in 0..65535 (0: any free port), got {port}")
    return port


def seed_list(text: str) -> tuple[int, ...]:
    """An argparse type: distinct comma-separated seeds in [0, 2^63). A repeated seed would train one run and count
    it twice, and a p-value over copies of one run is a fake; it is refused before any folder is made."""
    try:
        seeds = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, e.g. 0,1,2; got {text!r}") from None
    bad = [s for s in seeds if not 0 <= s < 2**63]
    if bad:
        raise argparse.ArgumentTypeError(f"seeds must be in [0, 2^63), got {bad[0]}")
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise argparse.ArgumentTypeError(
            f"seed {', '.join(map(str, repeated))} is given twice; each seed is one run: give distinct seeds (0,1,2)"
        )
    return seeds


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _parse_auto_bool(text: str) -> bool | None:
    if text.lower() in ("auto", "none"):
        return None
    try:
        return _parse_bool(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected true, false or auto, got {text!r}") from None


def _field_parser(annotation: object) -> tuple[Callable[[str], object], list[str] | None]:
    """How to parse one ModelConfig field from text: (converter, choices)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return str, list(args)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):  # `int | None`
        inner = next(a for a in args if a is not type(None))
        if inner is bool:  # `bool | None`: None is "auto", decided at run time
            return _parse_auto_bool, ["true", "false", "auto"]
        convert = _field_parser(inner)[0]
        return (lambda s: None if s.lower() == "none" else convert(s)), None
    if annotation is bool:
        return _parse_bool, None
    return typing.cast(Callable[[str], object], annotation), None


def add_dataclass_flags(
    parser: argparse.ArgumentParser,
    cls: type,
    prefix: str,
    title: str,
    shown: object | None = None,
    *,
    only: tuple[str, ...] | None = None,
    defaults: bool = False,
) -> None:
    """One `--field-name` flag per dataclass field (or per field in `only`); unset flags stay None and leave the
    value from preset or file, or with `defaults` take the field's default (then `none` can be asked for).

    The help shows each field's value in `shown` (e.g. the default preset's config), else its default."""
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if only is not None and f.name not in only:
            continue
        default = getattr(shown, f.name) if shown is not None else f.default
        convert, choices = _field_parser(hints[f.name])
        text = f.metadata.get("help", f"{cls.__name__}.{f.name}")
        if default is None and choices and "auto" in choices:
            default = "auto"
        group.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f"{prefix}{f.name}",
            type=convert,
            choices=choices if convert is str else None,  # a Literal; `bool | None` checks in its converter
            default=f.default if defaults else None,
            metavar="{" + ",".join(choices) + "}" if choices else f.name.upper(),
            help=f"{text} (default {default})" if default is not None else text,
        )


def add_config_flags(parser: argparse.ArgumentParser, preset: str) -> None:
    """ModelConfig overrides; the help shows the values of the command's default preset."""
    shown = ModelConfig.from_preset(preset, DEFAULT_VARIANT)
    title = f"model config overrides (default: the preset's value; shown for {preset} {DEFAULT_VARIANT})"
    add_dataclass_flags(parser, ModelConfig, "cfg_", title, shown)


def flag_values(args: argparse.Namespace, prefix: str) -> dict[str, object]:
    n = len(prefix)
    return {k[n:]: v for k, v in vars(args).items() if k.startswith(prefix) and v is not None}


def dataclass_values(args: argparse.Namespace, cls: type, prefix: str) -> dict[str, object]:
    """The values of flags added with `defaults=True`, None included."""
    return {f.name: getattr(args, prefix + f.name) for f in dataclasses.fields(cls) if hasattr(args, prefix + f.name)}


def config_overrides(args: argparse.Namespace) -> dict[str, object]:
    return flag_values(args, "cfg_")
