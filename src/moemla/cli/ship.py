"""`moemla export` and `moemla serve`: the ways out of moemla."""

from __future__ import annotations

import argparse
import json
import sys

from moemla.cli.flags import check_port
from moemla.config import GGUF_TYPES
from moemla.device import DTYPES


def cmd_export(args: argparse.Namespace) -> int:
    if args.web_assets and args.format != "web":
        raise ValueError("--web-assets is for --format web")
    if args.format in ("onnx", "web"):
        if args.quantize in GGUF_TYPES:
            raise ValueError(f"--quantize {args.quantize} is a GGUF type (--format gguf); {args.format} takes "
                             "none, int8 or int4")  # fmt: skip
        return _export_onnx(args)
    if args.format == "gguf":
        return _export_gguf(args)
    if args.quantize is not None:
        raise ValueError("--quantize is for --format onnx, web or gguf; a Hugging Face export takes --dtype")
    from moemla.export.hf import export_hf

    info = export_hf(
        args.run, args.out, checkpoint=args.checkpoint, architecture=args.architecture, dtype=args.dtype,
        overwrite=args.overwrite,
    )  # fmt: skip
    if args.json:
        print(json.dumps(info))
        return 0
    remote = info["architecture"] == "remote"
    print(f"wrote {info['out']}: {info['variant'] or 'custom'} as {info['architecture']} ({info['dtype']})")
    print("load it with:")
    print("  from transformers import AutoModelForCausalLM, AutoTokenizer")
    flag = ", trust_remote_code=True" if remote else ""
    print(f"  model = AutoModelForCausalLM.from_pretrained({info['out']!r}{flag})")
    print(f"  tokenizer = AutoTokenizer.from_pretrained({info['out']!r}{flag})")
    return 0


def _export_gguf(args: argparse.Namespace) -> int:
    from moemla.export.gguf import export_gguf
    from moemla.folders import GGUF_FILE, MODELFILE

    if args.architecture != "auto" or args.dtype != "float32":
        raise ValueError("--architecture and --dtype are for --format hf; a gguf export takes --quantize "
                         f"{'|'.join(GGUF_TYPES)}")  # fmt: skip
    if args.quantize not in (None, *GGUF_TYPES):
        raise ValueError(f"--quantize for --format gguf is {', '.join(GGUF_TYPES)} (llama.cpp's names), not "
                         f"{args.quantize}")  # fmt: skip
    manifest = export_gguf(args.run, args.out, qtype=args.quantize or "f16", checkpoint=args.checkpoint,
                           overwrite=args.overwrite)  # fmt: skip
    if args.json:
        print(json.dumps(manifest))
        return 0
    kv = manifest["kv_cache_bytes_per_token"]
    print(f"wrote {args.out}: {manifest['architecture']} GGUF ({manifest['type']}, "
          f"{manifest['bytes'] / 2**20:.1f} MiB); llama.cpp caches the latent and the RoPE key: {kv['f16']:,} "
          f"bytes/token in its f16 cache ({kv['f32']:,} in f32)")  # fmt: skip
    print("run it with llama.cpp or Ollama:")
    print(f"  llama-cli -m {args.out}/{GGUF_FILE} -p 'Once upon a time' -n 200")
    print(f"  ollama create moemla -f {args.out}/{MODELFILE} && ollama run moemla 'Once upon a time'")
    print(f"or through moemla (its sampler on llama.cpp): moemla generate {args.out} --prompt 'Once upon a time'")
    return 0


def _export_onnx(args: argparse.Namespace) -> int:
    from moemla.export.onnx import export_onnx

    if args.architecture != "auto" or args.dtype != "float32":
        raise ValueError(f"--architecture and --dtype are for --format hf; a {args.format} export takes --quantize")
    web = args.format == "web"
    quantize = args.quantize or ("int8" if web else "none")
    if web:
        from moemla.web.export import export_web

        manifest = export_web(args.run, args.out, quantize=quantize, checkpoint=args.checkpoint,
                              overwrite=args.overwrite, node_modules=args.web_assets)  # fmt: skip
    else:
        manifest = export_onnx(args.run, args.out, quantize=quantize, checkpoint=args.checkpoint,
                               overwrite=args.overwrite)  # fmt: skip
    if args.json:
        print(json.dumps(manifest))
        return 0
    size = sum(manifest["files"].values())
    check = manifest["check"]
    weights = "fp32" if manifest["quantize"] == "none" else manifest["quantize"]
    what = "a web page (ONNX in the browser, " if web else "ONNX ("
    print(f"wrote {args.out}: {manifest['variant'] or 'custom'} as {what}{weights} weights, "
          f"{size / 2**20:.1f} MiB, KV cache {manifest['kv_cache_bytes_per_token']:,} bytes/token) in "
          f"{manifest['export_seconds']} s; logits within {check['max_abs_logit_error']:.1e} of the torch model, "
          f"top-1 agreement {check['top1_agreement']:.0%}")  # fmt: skip
    for name in ("validation_perplexity", "fp32_validation_perplexity"):
        if manifest.get(name) is not None:
            print(f"{name.replace('_', ' ')}: {manifest[name]:.3f}")
    if "perplexity_not_measured" in manifest:
        print(f"validation perplexity not measured: {manifest['perplexity_not_measured']}")
    if web:
        print(f"open it in a browser: moemla web {args.out}   (any static file server works too, on one thread)")
        return 0
    print("run it without moemla or torch (numpy, onnxruntime, tokenizers):")
    print(f"  python {args.out}/run_onnx.py 'Once upon a time'")
    print(f"or with moemla: moemla generate {args.out} --prompt 'Once upon a time'")
    return 0


def add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a run's checkpoint as a Hugging Face model folder, or an ONNX Runtime folder (--format onnx)",
        description="Write a folder that transformers loads with AutoModelForCausalLM.from_pretrained: safetensors "
        "weights (the routing bias kept in fp32), config, tokenizer and generation config. Dense mha exports as "
        "GPT-2 and mha-rope as GPT-NeoX (exact, no remote code); every other variant as self-contained remote code "
        "(modeling_moemla.py, load with trust_remote_code=True) whose cache keeps MLA's latents. --format onnx writes "
        "one ONNX graph for prefill and cached steps (the cache in the model's own layout: MLA's latents), with a "
        "runner that needs only numpy, onnxruntime and tokenizers; moemla generate/serve/eval run the folder too.",
    )
    p.add_argument("run", help="run folder")
    p.add_argument("out", help="folder to write (must be new or empty, unless --overwrite)")
    p.add_argument(
        "--format", default="hf", choices=["hf", "onnx", "web", "gguf"],
        help="hf: a Hugging Face transformers folder (default); onnx: an ONNX Runtime folder (model.onnx whose cache "
        "keeps MLA's latents, manifest.json, tokenizer.json, run_onnx.py) that runs without torch; web: the onnx "
        "folder plus a static page that writes stories in the browser (onnxruntime-web; `moemla web OUT` serves it); "
        "gguf: model.gguf for llama.cpp and Ollama (the DeepSeek flavor: deepseek2 with the latent cache, or llama)",
    )  # fmt: skip
    p.add_argument(
        "--quantize", default=None, choices=["none", "int8", "int4", *GGUF_TYPES],
        help="ONNX weights: none (fp32), int8 (dynamic int8 MatMuls) or int4 (4-bit blocks, MatMulNBits); the "
        "routers stay fp32 (default: none for onnx, int8 for web, a quarter of the download). GGUF: f32, f16 "
        "(default), q8_0 or q4_0, llama.cpp's types (rows narrower than 32 stay f16)",
    )  # fmt: skip
    p.add_argument(
        "--web-assets", metavar="NODE_MODULES",
        help="for --format web offline: a node_modules folder from `npm ci` in moemla/web/page (default: the pinned "
        "onnxruntime-web and tokenizers tarballs, fetched once from the npm registry, checked and cached)",
    )  # fmt: skip
    p.add_argument(
        "--architecture",
        default="auto",
        choices=["auto", "native", "remote"],
        help="auto: a native transformers architecture where one is exact, else remote code (default auto)",
    )
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="weight dtype (default float32)")
    p.add_argument("--checkpoint", metavar="step_N", help="export this checkpoint (default: the newest)")
    p.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty OUT")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_export)


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from moemla.serve.app import serve
    except ImportError as err:
        missing = f"moemla serve needs the serve extra ({err.name} is missing)"
        raise ValueError(f"{missing}: pip install 'moemla[serve]'") from None
    if args.max_batch < 1:
        raise ValueError(f"--max-batch must be at least 1, got {args.max_batch}")
    check_port(args.port)
    if args.max_rows_per_request < 1:
        raise ValueError(f"--max-rows-per-request must be at least 1, got {args.max_rows_per_request}")
    if not args.max_body_mb > 0:
        raise ValueError(f"--max-body-mb must be positive, got {args.max_body_mb}")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"moemla serve: listening on {args.host}: the server has no authentication", file=sys.stderr)
    serve(args.run, host=args.host, port=args.port, device=args.device, checkpoint=args.checkpoint, name=args.name,
          max_batch=args.max_batch, cuda_graph=args.cuda_graph, compile=args.compile,
          max_body_mb=args.max_body_mb, max_rows=args.max_rows_per_request)  # fmt: skip
    return 0


def add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a run over an OpenAI-compatible HTTP API (completions, chat, streaming)",
        description="Serve /v1/models, /v1/completions (with logprobs and echo, as lm-eval's local-completions "
        "needs) and /v1/chat/completions, streaming on request. Concurrent requests are decoded together in "
        "batches. The model is a base model: chat messages are joined as plain text and continued.",
    )
    p.add_argument("run", help="run folder")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    p.add_argument("--checkpoint", metavar="step_N", help="serve this checkpoint (default: the newest)")
    p.add_argument("--name", help="model id clients pass as `model` (default: the run folder's name)")
    p.add_argument("--max-batch", type=int, default=16, help="most sequences decoded together (default 16)")
    p.add_argument(
        "--max-rows-per-request", type=int, default=256,
        help="most sequences (prompts x n) one request may ask for; more is a 400 (default 256). Rows of concurrent "
        "requests share batches in turn, so a large request does not hold back small ones",
    )  # fmt: skip
    p.add_argument(
        "--max-body-mb", type=float, default=2.0,
        help="largest request body in MiB; a larger one is answered 413 before it is read (default 2)",
    )  # fmt: skip
    p.add_argument(
        "--cuda-graph", action="store_true",
        help="on CUDA: decode steps replay a captured CUDA graph per batch and length bucket",
    )  # fmt: skip
    p.add_argument(
        "--compile", action="store_true",
        help="torch.compile the decode step once per batch and length bucket (fused kernels; combines with "
        "--cuda-graph); the first request of each bucket waits for its compile (~10-20 s on a CPU)",
    )  # fmt: skip
    p.set_defaults(func=cmd_serve)


def cmd_lm_eval(args: argparse.Namespace) -> int:
    try:
        from lm_eval.__main__ import cli_evaluate

        import moemla.export.harness  # noqa: F401  (registers --model moemla)
    except ImportError as err:
        missing = f"moemla lm-eval needs lm-evaluation-harness ({err.name} is missing)"
        raise ValueError(f"{missing}: pip install 'moemla[lm-eval]'") from None
    sys.argv = ["lm_eval", *_named_results(args.args)]
    cli_evaluate()
    return 0


def _named_results(argv: list[str]) -> list[str]:
    """lm-eval names its results folder after `pretrained=` (else a random id): pass the run there too."""
    out = list(argv)
    for i, arg in enumerate(out[:-1]):
        if arg == "--model_args" and "pretrained=" not in out[i + 1]:
            run = next((kv[4:] for kv in out[i + 1].split(",") if kv.startswith("run=")), None)
            if run:
                out[i + 1] += f",pretrained={run}"
    return out


def add_lm_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "lm-eval",
        help="run lm-evaluation-harness with moemla runs as --model moemla",
        description="lm-evaluation-harness's own command line with the model `moemla` registered: "
        "moemla lm-eval --model moemla --model_args run=RUN[,checkpoint=step_N,device=cuda] --tasks TASKS. "
        "Every other argument is lm-eval's (see `moemla lm-eval --help` past this line: `moemla lm-eval -h`).",
        add_help=False,
    )
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for lm_eval")
    p.set_defaults(func=cmd_lm_eval)


def cmd_import(args: argparse.Namespace) -> int:
    from moemla.export.hf_import import import_hf

    info = import_hf(args.folder, args.out, overwrite=args.overwrite)
    print(f"wrote {info['run']}: {info['variant'] or 'custom'} from {info['from']} ({info['architecture']})")
    print("evaluate, generate, bench, serve or export it as any run; `moemla train --resume` fine-tunes it")
    return 0


def add_import(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import",
        help="turn a folder written by `moemla export` (perhaps fine-tuned since) back into a run",
        description="Read an exported Hugging Face folder (remote code, GPT-2 or GPT-NeoX) and write a run folder "
        "with its model config, tokenizer and the weights as checkpoint step 0.",
    )
    p.add_argument("folder", help="a folder written by `moemla export --format hf`")
    p.add_argument("out", help="run folder to write (must be new or empty, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty OUT")
    p.set_defaults(func=cmd_import)


def cmd_web(args: argparse.Namespace) -> int:
    from moemla.web.server import make_server, network_notice, url

    server = make_server(args.folder, args.host, check_port(args.port))
    if notice := network_notice(args.host):
        print(notice, file=sys.stderr)
    print(f"serving {args.folder} at {url(server)} (cross-origin isolated: multi-threaded WebAssembly); Ctrl-C stops",
          flush=True)  # fmt: skip
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped")
    finally:
        server.server_close()
    return 0


def add_web(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "web",
        help="serve a web export folder on 127.0.0.1 and print its URL",
        description="Serve a folder written by `moemla export RUN OUT --format web` with the headers onnxruntime-web "
        "needs for multi-threaded WebAssembly (cross-origin isolation). The page runs the model in the browser; "
        "this server only sends files.",
    )
    p.add_argument("folder", help="a folder written by `moemla export RUN OUT --format web`")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine only)")
    p.set_defaults(func=cmd_web)


def add_commands(sub: argparse._SubParsersAction) -> None:
    add_export(sub)
    add_web(sub)
    add_import(sub)
    add_serve(sub)
    add_lm_eval(sub)
