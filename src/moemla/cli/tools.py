"""The inference and experiment commands: `moemla generate`, `moemla bench`, `moemla reproduce`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from moemla.cli.flags import (
    FLAVOR_HELP,
    add_config_flags,
    add_dataclass_flags,
    config_overrides,
    dataclass_values,
    positive_int,
    seed_list,
)
from moemla.config import (
    DEFAULT_FLAVOR,
    DEFAULT_PRESET,
    FLAVORS,
    PAPER_PRESET,
    SIZES,
    VARIANTS,
    ConfigError,
    ModelConfig,
)
from moemla.data.sources import DataError
from moemla.device import DTYPES
from moemla.experiments.tables import TABLES
from moemla.inference.sampling import SamplingConfig

ENGINE_HELP = (
    "torch: the model itself (any device, dtype, batch); numpy: the torch-free NumpyDecoder, one sequence "
    "in float32 on the CPU; numba: the same with compiled one-token steps, the fastest at batch 1 on a CPU "
    "(needs pip install 'moemla[fast]'; BENCHMARKS.md); onnx: onnxruntime on an ONNX export (moemla export --format "
    "onnx), any batch, on the CPU (needs pip install 'moemla[onnx]'); llama.cpp: a GGUF export (moemla export "
    "--format gguf, the DeepSeek flavor) through the xllamacpp binding (pip install 'moemla[gguf]'); bench times "
    "llama.cpp's own decode loop"
)
ENGINES = ["torch", "numpy", "numba", "onnx", "llama.cpp"]
CUDA_GRAPH_HELP = (
    "torch engine on CUDA: capture the one-token step as a CUDA graph per batch and length bucket over a static "
    "cache, then replay it (one launch per token); with --compile the compiled step is captured"
)
COMPILE_HELP = (
    "torch engine: torch.compile the one-token step once per batch and length bucket over a static cache (fused "
    "kernels; the first step of each bucket compiles, which takes a while); prefill stays eager"
)
QUANTIZE_HELP = (
    "int8: the CPU engine's weights as int8 with one scale per output channel (routed experts included); default none"
)


def cmd_generate(args: argparse.Namespace) -> int:
    from moemla.inference.generate import generate
    from moemla.inference.load import open_decoder
    from moemla.inference.sampling import PromptTooLong

    if args.prompts:
        path = Path(args.prompts)
        if not path.is_file():
            raise DataError(f"prompts file not found: {path}")
        prompts = [line for line in path.read_text().splitlines() if line.strip()]
    else:
        prompts = [args.prompt]
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
    sampling = SamplingConfig(**dataclass_values(args, SamplingConfig, "s_"))  # checked before the prompt prints
    model, tok = open_decoder(
        args.run, args.engine, device=args.device, checkpoint=args.checkpoint, batch_size=args.batch_size,
        quantize=args.quantize, mode="cuda-graph" if args.cuda_graph else "eager", compile=args.compile,
    )  # fmt: skip
    try:
        if args.batch_size > 1:  # whole texts, printed as each batch finishes
            for lo in range(0, len(prompts), args.batch_size):
                group = prompts[lo : lo + args.batch_size]
                texts = generate(model, tok, group, sampling.replace(seed=sampling.seed + lo), truncate=args.truncate,
                                 batch_size=args.batch_size)  # fmt: skip
                for i, text in enumerate(texts, start=lo):
                    print(f"--- {i + 1}/{len(prompts)}\n{text}", flush=True)
            return 0
        for i, prompt in enumerate(prompts):
            if len(prompts) > 1:
                print(f"--- {i + 1}/{len(prompts)}")
            print(prompt, end="", flush=True)
            generate(model, tok, [prompt], sampling.replace(seed=sampling.seed + i), truncate=args.truncate,
                     stream=lambda text: print(text, end="", flush=True))  # fmt: skip
            print()
        return 0
    except PromptTooLong as err:  # the one fit check's message, and the flag that cuts the prompt here
        raise ValueError(f"{err}, or pass --truncate to keep its end") from None


def cmd_bench(args: argparse.Namespace) -> int:
    from moemla.device import DTYPES, resolve_device
    from moemla.inference.bench import add_relative, bench, plot, print_table
    from moemla.inference.decoder import check_engine, engine_device

    variants = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ConfigError(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)} or 'all'")
    device, dtype = resolve_device(engine_device(args.engine, args.device)), DTYPES[args.dtype]
    batches = [int(b) for b in args.batch.split(",")]
    check_engine(args.engine, device, dtype, max(batches), not args.naive, args.compile or args.cuda_graph)
    overrides = config_overrides(args)
    if args.memory is not None:
        return _bench_memory(args, variants, device, dtype, overrides)
    rows = []
    for batch in batches:
        for v in variants:
            cfg = ModelConfig.from_preset(args.preset, v, args.flavor, **overrides)
            if not args.json:
                print(f"{v}, batch {batch} ...", file=sys.stderr, flush=True)
            if args.engine == "llama.cpp":  # llama.cpp's own loop on the weights exported to GGUF
                from moemla.export.gguf_bench import bench_llamacpp

                rows.append(bench_llamacpp(cfg, batch, args.context, args.new_tokens, quantize=args.quantize,
                                           dtype=dtype))  # fmt: skip
                continue
            rows.append(bench(
                cfg, batch, args.context, args.new_tokens, engine=args.engine, device=device, dtype=dtype,
                absorbed=not args.naive, compile=args.compile, quantize=args.quantize, cuda_graph=args.cuda_graph,
            ))  # fmt: skip
    add_relative(rows)
    if args.plot:
        plot(rows, args.plot)
    if args.json:
        print(json.dumps(rows))
        return 0
    weights = "int8 weights" if args.quantize == "int8" else args.dtype
    if args.engine == "llama.cpp":  # its own type names, and its default f16 cache
        weights = f"{rows[0]['dtype']} weights, f16 cache"
    title = f"{args.preset}, {args.engine} engine, {rows[0]['device']}, {weights}, context {args.context}"
    print_table(rows, title + ", random weights")
    print(f"memory: {rows[0]['peak_memory_kind']}" + (f"; plot: {args.plot}" if args.plot else ""))
    return 0


def _bench_memory(args: argparse.Namespace, variants: list[str], device, dtype, overrides: dict) -> int:
    """moemla bench --memory GiB: the largest batch each variant fits, and its decode speed there."""
    from moemla.inference.bench import bench_memory, print_memory_table

    if args.batch != "1" or args.engine != "torch":
        raise ConfigError("--memory chooses the batch for the torch engine; drop --batch and --engine")
    if args.memory <= 0:
        raise ConfigError(f"--memory must be a positive number of GiB, got {args.memory}")
    rows = []
    for v in variants:
        cfg = ModelConfig.from_preset(args.preset, v, args.flavor, **overrides)
        if not args.json:
            print(f"{v}: fitting {args.memory} GiB ...", file=sys.stderr, flush=True)
        rows.append(bench_memory(
            cfg, args.context, args.new_tokens, args.memory, cap=args.max_batch, device=device, dtype=dtype,
            absorbed=not args.naive, compile=args.compile, cuda_graph=args.cuda_graph,
        ))  # fmt: skip
    if args.json:
        print(json.dumps(rows))
    else:
        print_memory_table(rows, f"{args.preset}, {device}, {args.dtype}, context {args.context}, {args.memory} GiB")
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from moemla.experiments.reproduce import reproduce, summarize

    if args.table == "summary":
        print(summarize(args.out or "results"))
        return 0
    seeds = args.seeds
    if args.endpoint and not args.judge_model:
        raise ConfigError("--endpoint needs --judge-model: the judge model's name at that endpoint")
    steps = None if args.tokens else args.steps
    rows = tuple(args.rows.split(",")) if args.rows else None
    shape = {"tokens": args.tokens, "device": args.device, "batch_size": args.batch_size, "seq_len": args.seq_len,
             "rows": rows, "reuse": tuple(args.reuse.split(",")) if args.reuse else (),
             "flavor": args.flavor}  # fmt: skip
    if args.plan:
        from moemla.device import resolve_device
        from moemla.experiments import plan as planning
        from moemla.experiments.reproduce import setup

        s = setup(args.table, args.preset, steps, seeds, args.data, args.out, **shape)
        device = resolve_device(s.tc.device)
        load = planning.cpu_load() if device.type == "cpu" else None  # before our own probes add to it
        rows = planning.plan(s, log=lambda line: print(line, file=sys.stderr))
        print(planning.plan_markdown(rows, str(device), planning.busy_note(load, os.cpu_count() or 1)))
        return 0
    result = reproduce(
        args.table, args.preset, steps, seeds, args.data, args.out, endpoint=args.endpoint,
        judge_model=args.judge_model, samples=args.samples, **shape,
    )  # fmt: skip
    print(result["markdown"])
    print()
    for c in result["claims"]:
        print(f"{c.verdict:>14}: {c.text} (paper {c.paper}, ours {c.ours})")
    return 0


def cmd_judge(args: argparse.Namespace) -> int:
    from moemla.eval.quality import judge_runs
    from moemla.eval.samples import SampleSettings

    if not args.offline and not args.endpoint:
        raise ConfigError(
            "give --endpoint URL --model NAME to score stories with an LLM judge, or --offline for the judge-free "
            "statistics only (nothing leaves this machine without --endpoint)"
        )
    if args.offline and args.endpoint:
        raise ConfigError("--offline sends nothing anywhere: drop --endpoint, or drop --offline to judge")
    if not 0.0 <= args.max_unparsed <= 1.0:
        raise ConfigError(f"--max-unparsed must be a share in [0, 1], got {args.max_unparsed}")
    sampling = dataclass_values(args, SamplingConfig, "s_")
    settings = SampleSettings(samples=args.samples, batch_size=args.batch_size, **sampling)  # type: ignore[arg-type]
    result = judge_runs(
        args.runs, args.out, endpoint=args.endpoint, model=args.model, prompts=args.prompts, settings=settings,
        concurrency=args.concurrency, device=args.device, log=lambda line: print(line, file=sys.stderr),
    )  # fmt: skip
    print(json.dumps(result) if args.json else (Path(args.out) / "judge.md").read_text())
    j = result["judge"]
    if j is not None and j["unparsed"] > args.max_unparsed * j["judged"]:
        print(
            f"moemla judge: {j['unparsed']} of {j['judged']} replies ({j['unparsed'] / j['judged']:.0%}) could not be "
            f"read as scores, more than --max-unparsed {args.max_unparsed:.0%}; the replies are in "
            f"{Path(args.out) / 'judgments.jsonl'} (try another --model)",
            file=sys.stderr,
        )
        return 1
    return 0


def add_judge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "judge",
        help="story quality as the paper's Table 8: an LLM judge over an OpenAI-compatible endpoint, plus "
        "judge-free statistics",
        description="Generate seeded story completions from each run, score each on grammar, coherence, "
        "creativity and overall quality (1-10) with any OpenAI-compatible chat endpoint (OpenAI, vLLM, llama.cpp "
        "server, Ollama), and write DIR/judge.md, judge.png, judge.json and the caches "
        "completions.jsonl and judgments.jsonl (a rerun asks nothing twice). The key comes from OPENAI_API_KEY "
        "(optional for local servers) and is never printed. --offline computes distinct-1/2, the repeated 4-gram "
        "rate, endings and lengths without any network.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders to compare")
    p.add_argument(
        "--endpoint", help="OpenAI-style base URL, e.g. http://127.0.0.1:8000/v1 or https://api.openai.com/v1"
    )
    p.add_argument("--model", help="the judge model's name at the endpoint, e.g. gpt-4o or the name vLLM serves")
    p.add_argument("--offline", action="store_true", help="judge-free statistics only; nothing leaves the machine")
    p.add_argument("--out", default="judge", help="output folder, also the caches' home (default ./judge)")
    p.add_argument("--samples", type=int, default=100, help="completions per run (the paper: 100)")
    p.add_argument("--prompts", default="stories-v1", help="shipped prompt set (stories-v1) or a file, one per line")
    p.add_argument("--batch-size", type=int, default=16, help="completions generated together")
    p.add_argument("--concurrency", type=int, default=4, help="judge requests in flight at most")
    p.add_argument(
        "--max-unparsed", type=float, default=0.1,
        help="exit 1 when more than this share of judge replies could not be read as scores (default 0.1)",
    )  # fmt: skip
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto (for generating)")
    p.add_argument("--json", action="store_true", help="print judge.json instead of the report")
    fields = ("temperature", "top_k", "top_p", "max_new_tokens", "seed")
    add_dataclass_flags(p, SamplingConfig, "s_", "sampling (SamplingConfig; completion i uses seed + i)", only=fields,
                        defaults=True)  # fmt: skip
    p.set_defaults(func=cmd_judge)


def add_reproduce(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "reproduce",
        help="re-run one of the paper's tables at an affordable scale and report it beside the paper's numbers",
        description="Train every run of a table (finished runs are skipped, so an interrupted sweep resumes), then "
        "write TABLE.md (beside the paper's numbers), results.json, figures and summary.md (the paper's claims "
        "with our measurement and a verdict) into --out. `moemla reproduce summary` gathers every table under "
        "results/ into results/summary.md.",
    )
    p.add_argument(
        "table",
        choices=[*TABLES, "summary"],
        help="; ".join(f"{name}: {t.help}" for name, t in TABLES.items()) + "; summary: all claims from results/",
    )
    p.add_argument(
        "--preset", default=DEFAULT_PRESET,
        help=f"size preset ({', '.join(SIZES)}); table7 takes a list, or one size meaning every size up to it",
    )  # fmt: skip
    p.add_argument("--steps", type=positive_int, default=250, help="optimizer steps per run (default 250)")
    p.add_argument("--tokens", type=positive_int, help="training tokens per run (instead of --steps)")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    p.add_argument("--seeds", type=seed_list, default=(0,), help="distinct comma-separated seeds, e.g. 0,1,2")
    p.add_argument(
        "--batch-size", type=positive_int, help="sequences per optimizer step (default 16; a GPU wants more)"
    )
    p.add_argument("--seq-len", type=positive_int, help="tokens per training sequence (default 256)")
    p.add_argument(
        "--flavor", default=DEFAULT_FLAVOR, choices=list(FLAVORS),
        help="the block every row is built with: paper (default) or deepseek (RMSNorm, SwiGLU, joint latent, sigmoid "
        "routing): the paper's claims re-tested in DeepSeek-V3's block; results go to results/TABLE-PRESET-deepseek",
    )  # fmt: skip
    p.add_argument("--rows", help="only these rows of the table, comma-separated (e.g. mha,mha-rope,moe-mla-rope)")
    p.add_argument(
        "--reuse", metavar="FOLDERS",
        help="results folders (comma-separated) whose finished runs of the very same model, settings, seed and data "
        "are copied instead of trained again (e.g. Table 7's tiny rows from results/table2-tiny)",
    )  # fmt: skip
    p.add_argument(
        "--plan", action="store_true",
        help="train nothing: print each run's tokens and its time on this device, measured by a few real steps",
    )  # fmt: skip
    p.add_argument("--data", help="prepared folder (default: the built-in corpus in data/builtin)")
    p.add_argument("--out", help="output folder (default results/TABLE-PRESET; for summary, the results folder)")
    p.add_argument("--endpoint", help="table8: OpenAI-style base URL of the judge (without it: statistics only)")
    p.add_argument("--judge-model", help="table8: the judge model's name at --endpoint")
    p.add_argument("--samples", type=positive_int, default=100, help="table8: completions judged per variant")
    p.set_defaults(func=cmd_reproduce)


def add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="sample text from a trained run, streamed as it is produced",
        description="Continue prompts with a run's latest checkpoint: KV-cached prefill, then one token per step "
        "(MLA decodes over its latents). Stops at <|endoftext|>.",
    )
    p.add_argument("run", help="run folder")
    p.add_argument("--prompt", default="Once upon a time", help="prompt text")
    p.add_argument("--prompts", help="file with one prompt per line (overrides --prompt)")
    p.add_argument("--truncate", action="store_true", help="cut prompts longer than the context from the left")
    p.add_argument("--checkpoint", metavar="step_N", help="generate from this checkpoint (default: the newest)")
    p.add_argument(
        "--batch-size", type=int, default=1,
        help="decode this many prompts of --prompts together (torch engine, left-padded; printed per batch, "
        "not streamed); each prompt draws the tokens it draws alone",
    )  # fmt: skip
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    p.add_argument(
        "--engine", default="auto", choices=["auto", *ENGINES],
        help=ENGINE_HELP + "; auto (default): onnx for an ONNX export folder; for a run, numba on a CPU when "
        "installed, else numpy there, torch on a GPU",
    )  # fmt: skip
    p.add_argument("--quantize", default="none", choices=["none", "int8"], help=QUANTIZE_HELP)
    p.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    p.add_argument("--cuda-graph", action="store_true", help=CUDA_GRAPH_HELP)
    add_dataclass_flags(p, SamplingConfig, "s_", "sampling (SamplingConfig, as generate() and exports)", defaults=True)
    p.set_defaults(func=cmd_generate)


def add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="KV-cache bytes, prefill/decode speed, latency and memory per variant (random weights)",
        description="Measure inference per variant with random weights (speed does not depend on training).",
    )
    p.add_argument("--preset", default=PAPER_PRESET, choices=list(SIZES), help=f"size preset (default {PAPER_PRESET})")
    p.add_argument("--variants", default="mha,moe-mla-rope,moe-mla-drope", help="comma-separated, or all")
    p.add_argument(
        "--flavor",
        default=DEFAULT_FLAVOR,
        choices=list(FLAVORS),
        help=FLAVOR_HELP,
    )
    p.add_argument("--batch", default="1", help="comma-separated batch sizes, e.g. 1,16")
    p.add_argument("--context", type=int, default=512, help="positions filled at the end of decoding")
    p.add_argument("--new-tokens", type=int, default=64, help="decode steps (the prompt is context - new tokens)")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="weights and cache")
    p.add_argument("--naive", action="store_true", help="MLA decode through re-expanded K and V (no absorption)")
    p.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    p.add_argument("--cuda-graph", action="store_true", help=CUDA_GRAPH_HELP)
    p.add_argument("--engine", default="torch", choices=ENGINES, help=ENGINE_HELP)
    p.add_argument(
        "--quantize", default="none", choices=["none", "int8", "int4"],
        help=QUANTIZE_HELP + "; with --engine onnx: int8 (dynamic int8 MatMuls) or int4 (4-bit MatMulNBits), the "
        "embedding and routed experts int8 either way; with --engine llama.cpp: int8 as q8_0, int4 as q4_0 (none: "
        "f32, or f16 with --dtype float16)",
    )  # fmt: skip
    p.add_argument(
        "--memory", type=float, metavar="GiB",
        help="for this memory budget, the largest batch of --context-token sequences each variant fits (weights + "
        "KV cache) and its decode speed at that batch; add --max-seq-len 4096 --context 4096 for long contexts",
    )  # fmt: skip
    p.add_argument("--max-batch", type=int, help="with --memory: measure at most this batch (the fit is still shown)")
    p.add_argument("--plot", help="write a bar chart to this PNG")
    p.add_argument("--json", action="store_true", help="print one JSON list of rows")
    add_config_flags(p, PAPER_PRESET)
    p.set_defaults(func=cmd_bench)


def add_commands(sub: argparse._SubParsersAction) -> None:
    """generate, bench, reproduce, judge: using and measuring trained models."""
    for add in (add_generate, add_bench, add_reproduce, add_judge):
        add(sub)
