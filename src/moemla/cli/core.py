"""The `moemla` command: thin argument parsing over the library."""

from __future__ import annotations

import argparse
import json
import math
import sys
import typing

from moemla import accounting
from moemla.cli.flags import (
    FLAVOR_HELP,
    add_config_flags,
    add_dataclass_flags,
    config_overrides,
    flag_values,
    positive_int,
)
from moemla.config import (
    DEFAULT_FLAVOR,
    DEFAULT_PRESET,
    DEFAULT_VARIANT,
    FLAVORS,
    PAPER_PRESET,
    SIZES,
    VARIANTS,
    ModelConfig,
)
from moemla.data.prepare import STORIES, VAL_FRACTION, VOCAB_SIZE
from moemla.demo import STEPS as DEMO_STEPS
from moemla.train.config import TrainConfig


def finite_or_null(obj: object) -> object:
    """obj with every NaN or infinite float replaced by None, which JSON can say (NaN and Infinity it cannot)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_or_null(v) for v in obj]
    return obj


def _human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _print_table(rows: list[dict[str, object]]) -> None:
    from rich.console import Console
    from rich.table import Table

    r0 = rows[0]
    block = f"{r0['flavor']} block ({r0['norm']}, {r0['ffn_activation']}" + (f", {r0['latent']} latent" if
                                                                           r0["latent"] else "") + ")"  # fmt: skip
    table = Table(title=f"{r0['n_layers']} layers, d={r0['dim']}, vocab {r0['vocab_size']}, {block}")
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
    configs = [ModelConfig.from_preset(args.preset, v, args.flavor, **overrides) for v in variants]
    rows = [accounting.summary(cfg, args.context, args.dtype) for cfg in configs]
    if args.json:
        print(json.dumps(rows if args.all_variants else rows[0]))
    else:
        _print_table(rows)
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from moemla.data.prepare import prepare_data

    folder, m = prepare_data(
        dataset=args.dataset, text=args.text, out=args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
        stories=args.stories, corpus_seed=args.corpus_seed, val_fraction=args.val_fraction, overwrite=args.overwrite,
        include=args.include, exclude=args.exclude, log=lambda line: print(line, file=sys.stderr),
    )  # fmt: skip
    splits = m["splits"]
    print(
        f"{folder}: {splits['train']['stories']:,} training stories ({splits['train']['tokens']:,} tokens), "
        f"{splits['val']['stories']:,} validation stories ({splits['val']['tokens']:,} tokens), "
        f"vocabulary {m['tokenizer']['vocab_size']:,}"
    )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from moemla.train.launch import run_training

    result = run_training(
        args.data, out=args.out, resume=args.resume, preset=args.preset, variant=args.variant, flavor=args.flavor,
        config_file=args.config, model_flags=flag_values(args, "cfg_"), train_flags=flag_values(args, "tc_"),
        checkpoint_name=args.checkpoint, new_data=args.new_data,
    )  # fmt: skip
    print(json.dumps(result) if args.json else f"done: step {result['step']}, val loss {result.get('val_loss')}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from moemla.eval.folder_eval import evaluate_run

    r = evaluate_run(
        args.run, data_dir=args.data, text=args.text, split=args.split, max_tokens=args.max_tokens,
        batch_size=args.batch_size, device=args.device, checkpoint_name=args.checkpoint,
    )  # fmt: skip
    if args.json:
        print(json.dumps(finite_or_null(r), allow_nan=False))  # strict JSON: an infinite perplexity is null
        return 0
    ci = "1 batch: no interval" if r["val_ppl_ci95"] is None else "95% CI {:.3f}-{:.3f}".format(*r["val_ppl_ci95"])
    bpb = f"{r['bits_per_byte']:.4f} bits per byte" if r["bits_per_byte"] is not None else "no text bytes"
    print(f"{r['run']}: loss {r['val_loss']:.4f}, perplexity {r['val_ppl']:.3f} ({ci}), {bpb}")
    print(f"{r['tokens']:,} tokens in {r['batches']} batches")
    if "fp32" in r:  # an export: beside its run's own fp32 model on the same windows
        print(f"the run's fp32 model ({r['fp32']['checkpoint'] or 'newest checkpoint'}, torch): perplexity "
              f"{r['fp32']['val_ppl']:.3f}; this export ({r['engine']}) {r['ppl_vs_fp32']:+.2%}")  # fmt: skip
    if r["expert_load_cv"] is not None:
        print("expert-load CV per layer: " + ", ".join(f"{cv:.3f}" for cv in r["expert_load_cv"]))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from moemla.demo import run_demo

    run_demo(args.out, args.steps, args.stories, fresh=args.fresh)
    return 0


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare",
        help="tokenize a corpus into memory-mapped shards with a held-out validation split",
        description="Tokenize stories (the built-in generator, TinyStories, or local files) into a prepared folder "
        "that every run can reuse. An existing folder prepared the same way is reused; a different tokenizer "
        "or source is refused.",
    )
    p.add_argument(
        "--dataset",
        default="builtin",
        choices=["builtin", "tinystories"],
        help="builtin: our seeded story generator (offline); tinystories: the paper's data from the hub",
    )
    p.add_argument(
        "--text",
        nargs="+",
        metavar="PATH",
        help="local .txt (stories split by <|endoftext|> or blank lines), .jsonl ('text') or .parquet files; "
        "a folder or a quoted glob pattern ('src/**/*.py') takes each UTF-8 text file as one document",
    )
    p.add_argument(
        "--include", action="append", metavar="GLOB",
        help="with a folder or glob: keep only files whose path below it or name matches (repeatable), e.g. '*.py'",
    )  # fmt: skip
    p.add_argument(
        "--exclude", action="append", metavar="GLOB",
        help="with a folder or glob: drop files whose path below it or name matches (repeatable), e.g. '*/test/*'",
    )  # fmt: skip
    p.add_argument("--out", help="output folder (default data/builtin, data/tinystories or data/text)")
    p.add_argument(
        "--tokenizer",
        default="bpe",
        help="bpe: train a byte-level BPE on the data; gpt2: GPT-2's from the hub; or a tokenizer.json path",
    )
    p.add_argument("--vocab-size", type=int, default=VOCAB_SIZE, help="BPE vocabulary size (with --tokenizer bpe)")
    p.add_argument(
        "--stories", type=int, default=STORIES, help="stories to generate (builtin) or to read at most (tinystories)"
    )
    p.add_argument("--corpus-seed", type=int, default=0, help="seed of the built-in generator")
    p.add_argument("--val-fraction", type=float, default=VAL_FRACTION, help="share of stories held out for validation")
    p.add_argument("--overwrite", action="store_true", help="replace a folder prepared differently")
    p.set_defaults(func=cmd_prepare)  # fmt: skip


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model on a prepared folder (resumable; DDP under torchrun)",
        description="Train with the paper's recipe (§3.3) unless flags or --config say otherwise. Checkpoints are "
        "written atomically; --resume continues a killed run exactly. For data parallelism launch with "
        "`torchrun --nproc-per-node N -m moemla train ...`.",
    )
    p.add_argument(
        "--data",
        help="prepared folder (from `moemla prepare`; default data/builtin, and with --resume the run's own data)",
    )
    p.add_argument("--out", help="run folder (default runs/PRESET-VARIANT)")
    p.add_argument("--preset", choices=list(SIZES), help=f"size preset (default {DEFAULT_PRESET})")
    p.add_argument("--variant", choices=list(VARIANTS), help=f"architecture variant (default {DEFAULT_VARIANT})")
    p.add_argument(
        "--flavor",
        choices=list(FLAVORS),
        help=FLAVOR_HELP,
    )
    p.add_argument("--config", help="JSON or TOML file with preset, variant, model {...} and train {...}")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument(
        "--checkpoint", metavar="step_N", help="with --resume: continue from this checkpoint, not the newest"
    )
    p.add_argument(
        "--new-data", action="store_true",
        help="with --resume and --data: go on with data other than the run was trained on (same tokenizer)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the final metrics as JSON")
    add_config_flags(p, DEFAULT_PRESET)
    # what a new run of the default preset gets: the paper's recipe, its sequences cut to the model's context
    context = ModelConfig.from_preset(DEFAULT_PRESET, DEFAULT_VARIANT).max_seq_len
    shown = TrainConfig(seq_len=min(TrainConfig.seq_len, context))
    title = f"training settings (default: the paper's recipe (§3.3); seq-len cut to {DEFAULT_PRESET}'s context)"
    add_dataclass_flags(p, TrainConfig, "tc_", title, shown)
    p.set_defaults(func=cmd_train)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="validation loss, perplexity and expert-load CV of a trained run",
        description="Evaluate a run's latest checkpoint on a prepared folder's validation split (default: the "
        "folder it was trained on) or on raw text files.",
    )
    p.add_argument("run", help="run folder")
    p.add_argument("--data", help="prepared folder (default: the run's training data)")
    p.add_argument("--text", nargs="+", metavar="PATH", help="evaluate raw text files with the run's tokenizer")
    p.add_argument("--split", default="val", choices=["val", "train"], help="split of the prepared folder")
    p.add_argument("--max-tokens", type=positive_int, default=None, help="evaluate at most this many tokens")
    p.add_argument(
        "--batch-size", type=positive_int, default=None, help="sequences per batch (default the run's micro-batch)"
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    p.add_argument("--checkpoint", metavar="step_N", help="evaluate this checkpoint (default: the newest)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_eval)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the main job: train tiny MoE-MLA-RoPE and MHA models on the built-in corpus and compare them",
        description="Prepare the built-in corpus, train the tiny moe-mla-rope and mha models for a few minutes each "
        "on CPU, then print a side-by-side table, a sample story from each, and write plots.",
    )
    p.add_argument("--out", default="runs/demo", help="folder for data, both runs and the plots (default runs/demo)")
    p.add_argument("--steps", type=int, default=None, help=f"training steps per model (default {DEMO_STEPS})")
    p.add_argument("--stories", type=int, default=None, help=f"built-in stories to generate (default {STORIES:,})")
    p.add_argument("--fresh", action="store_true", help="retrain even if the demo's runs are already finished")
    p.set_defaults(func=cmd_demo)


def _add_info(sub: argparse._SubParsersAction) -> None:
    info = sub.add_parser(
        "info",
        help="parameters, active parameters, FLOPs and KV-cache bytes per token of a configuration",
        description="Closed-form accounting of a model configuration (no model is built).",
    )
    info.add_argument(
        "--preset", default=PAPER_PRESET, choices=list(SIZES), help="size preset (Table 1, plus tiny and debug)"
    )
    info.add_argument("--variant", default=DEFAULT_VARIANT, choices=list(VARIANTS), help="architecture variant")
    info.add_argument(
        "--flavor",
        default=DEFAULT_FLAVOR,
        choices=list(FLAVORS),
        help=FLAVOR_HELP,
    )
    info.add_argument("--all-variants", action="store_true", help="compare all variants side by side")
    info.add_argument("--context", type=int, default=None, help="context length for FLOPs (default max_seq_len)")
    info.add_argument(
        "--dtype", default="float32", choices=sorted(accounting.DTYPE_BYTES), help="KV-cache element type"
    )
    info.add_argument("--json", action="store_true", help="print JSON (one object, or a list with --all-variants)")
    add_config_flags(info, PAPER_PRESET)
    info.set_defaults(func=cmd_info)


def add_commands(sub: argparse._SubParsersAction) -> None:
    """info, prepare, train, eval, demo: the model's life from configuration to comparison."""
    for add in (_add_info, _add_prepare, _add_train, _add_eval, _add_demo):
        add(sub)
