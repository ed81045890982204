import importlib.util
import json
from pathlib import Path

import pytest
import torch

from moemla.cli import main
from moemla.inference.generate import generate_ids, generate_ids_batch
from moemla.inference.sampling import SamplingConfig, filter_logits, greedy, sample, sample_batch
from moemla.model import KVCache

from .conftest import ALL_VARIANTS, build


def test_top_k_keeps_exactly_the_k_largest() -> None:
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0, 0.0]])
    kept = filter_logits(logits, top_k=2)
    assert torch.isfinite(kept).tolist() == [[False, True, True, False, False]]


def test_top_p_keeps_the_smallest_nucleus() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    assert torch.isfinite(filter_logits(logits, top_p=0.5)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.8)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.81)).tolist() == [[True, True, True, False]]
    shuffled = logits[:, [2, 0, 3, 1]]  # order of the vocabulary does not matter
    assert torch.isfinite(filter_logits(shuffled, top_p=0.8)).tolist() == [[False, True, False, True]]


def test_sampling_is_seeded_and_greedy_at_zero_temperature() -> None:
    logits = torch.randn(4, 50)
    free = SamplingConfig(temperature=1.0, top_k=None)
    draw = [sample(logits, free, torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(draw[0], draw[1])
    assert torch.equal(sample(logits, greedy(), torch.Generator()), logits.argmax(-1))
    filtered = [sample(logits, free.replace(top_k=3), torch.Generator().manual_seed(s)) for s in range(20)]
    top3 = logits.topk(3).indices
    assert all((top3 == f[:, None]).any(-1).all() for f in filtered)


def test_a_batch_samples_each_row_as_it_samples_alone_with_its_own_settings() -> None:
    """sample_batch draws row i's token from row i's generator and settings, whatever the other rows are."""
    logits = torch.randn(5, 300)
    configs = [
        greedy(),
        SamplingConfig(temperature=1.0, top_k=None),
        SamplingConfig(temperature=0.7, top_k=5),
        SamplingConfig(temperature=1.3, top_k=None, top_p=0.6),
        SamplingConfig(temperature=0.9, top_k=50, top_p=0.9),
    ]
    for seed in range(20):
        together = sample_batch(logits, configs, [torch.Generator().manual_seed(seed + i) for i in range(5)])
        alone = [sample_batch(logits[i : i + 1], configs[i : i + 1], [torch.Generator().manual_seed(seed + i)])
                 for i in range(5)]  # fmt: skip
        assert together.tolist() == [int(a) for a in alone]


def test_sampled_tokens_follow_the_filtered_distribution() -> None:
    """Over many draws each token's frequency is its probability after temperature, top-k and top-p."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    for s in (SamplingConfig(temperature=1.0, top_k=None), SamplingConfig(temperature=0.5, top_k=3),
              SamplingConfig(temperature=1.0, top_k=None, top_p=0.8)):  # fmt: skip
        want = filter_logits(logits / s.temperature, s.top_k, s.top_p).softmax(-1)[0]
        g = torch.Generator().manual_seed(0)
        counts = torch.bincount(torch.cat([sample(logits, s, g) for _ in range(20_000)]), minlength=6)
        torch.testing.assert_close(counts / counts.sum(), want, atol=0.015, rtol=0)


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_greedy_with_cache_equals_greedy_without(variant: str) -> None:
    model = build(variant)
    prompt = torch.randint(0, model.cfg.vocab_size, (7,)).tolist()
    cached = generate_ids(model, prompt, greedy(20))
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(20):
            ids.append(int(model(torch.tensor([ids]))[0][0, -1].argmax()))
    assert cached == ids[len(prompt) :]


def test_prompt_longer_than_context_is_a_clear_error() -> None:
    model = build("mha")
    with pytest.raises(ValueError, match="shorten the prompt"):
        generate_ids(model, [1] * model.cfg.max_seq_len, greedy(5))


def test_bench_json_rows(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "--preset", "debug", "--variants", "mha,moe-mla-rope,moe-mla-drope", "--batch", "1,2"]
    assert main([*argv, "--context", "32", "--new-tokens", "4", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 6
    keys = {"variant", "batch", "kv_cache_bytes_per_token", "prefill_tokens_per_s", "decode_tokens_per_s"}
    assert all(keys <= set(r) and r["decode_tokens_per_s"] > 0 for r in rows)
    kv = {r["variant"]: r["kv_vs_mha"] for r in rows}
    assert kv["moe-mla-rope"] == 0.5 and 0.5 < kv["moe-mla-drope"] < 1


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_left_padded_batch_gives_each_prompt_its_own_logits(variant: str) -> None:
    model = build(variant)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [1, 2, 3, 4, 5]]
    cache = KVCache(model.cfg, 3, max_len=12, pad=[0, 5, 2])
    ids = torch.tensor([prompts[0], [0] * 5 + prompts[1], [0] * 2 + prompts[2]])
    with torch.no_grad():
        batch = [model(ids, cache=cache)[0][:, -1]]  # prefill
        batch += [model(torch.tensor([[t], [t + 1], [t + 2]]), cache=cache)[0][:, -1] for t in (20, 30)]  # steps
        for i, p in enumerate(prompts):
            alone = model(torch.tensor([[*p, 20 + i, 30 + i]]))[0][0, -3:]  # no cache, no padding
            torch.testing.assert_close(torch.stack([b[i] for b in batch]), alone, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", ["mha", "moe-mla-rope", "moe-mla-drope"])
def test_batched_generation_draws_what_each_prompt_draws_alone(variant: str) -> None:
    model = build(variant)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [1, 2, 3, 4, 5]]
    for temperature in (0.0, 1.0):
        s = SamplingConfig(temperature=temperature, max_new_tokens=8)
        got = generate_ids_batch(model, prompts, s, seeds=[7, 8, 9], stop=17)
        want = [generate_ids(model, p, s.replace(seed=7 + i), stop=17) for i, p in enumerate(prompts)]
        assert got == want


def test_batched_generation_refuses_bad_input() -> None:
    model = build("mla")
    with pytest.raises(ValueError, match="non-empty"):
        generate_ids_batch(model, [[1, 2], []], greedy(4))
    with pytest.raises(ValueError, match="context is 64"):
        generate_ids_batch(model, [[1] * 64], greedy(4))
    with pytest.raises(ValueError, match="pad needs 2 counts"):
        KVCache(model.cfg, 2, max_len=8, pad=[1, 9])


def test_generate_cli_streams_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data, run = tmp_path / "data", tmp_path / "run"
    assert main(["prepare", "--stories", "300", "--vocab-size", "300", "--out", str(data)]) == 0
    assert main(["train", "--data", str(data), "--out", str(run), "--preset", "debug", "--max-steps", "1",
                 "--batch-size", "2", "--micro-batch-size", "2"]) == 0  # fmt: skip
    capsys.readouterr()
    # NOTE: equal tokens across engines is a CPU invariant (CUDA's kernels round differently): pin the CPU
    cpu = ["--device", "cpu"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Once upon a time\nThe cat\n")
    assert main(["generate", str(run), "--prompts", str(prompts), "--max-new-tokens", "5", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "--- 2/2" in out and "The cat" in out
    assert main(["generate", str(run), "--prompt", "a " * 100]) == 1
    assert "--truncate" in capsys.readouterr().err
    assert main(["generate", str(run), "--prompt", "a " * 100, "--truncate", "--max-new-tokens", "3"]) == 0
    # every engine draws the same tokens from the same seed (auto: numba or numpy here, on the CPU)
    capsys.readouterr()
    argv = ["generate", str(run), "--prompt", "The cat", "--max-new-tokens", "8", "--seed", "5", "--top-k", "20", *cpu]
    assert main([*argv, "--engine", "torch"]) == 0
    torch_text = capsys.readouterr().out
    for engine in ["numpy", "auto"] + (["numba"] if importlib.util.find_spec("numba") else []):
        assert main([*argv, "--engine", engine]) == 0
        assert capsys.readouterr().out == torch_text, engine
    # the CPU engine on CUDA: refused by make_decoder where CUDA exists, by resolve_device where it does not
    assert main([*argv, "--engine", "numpy", "--device", "cuda"]) in (1, 2)
    assert "--device cpu" in capsys.readouterr().err
    # a batch of prompts, left-padded, prints what the prompts print one by one
    argv = ["generate", str(run), "--prompts", str(prompts), "--max-new-tokens", "6", "--seed", "2", "--top-k", "9"]
    argv += cpu
    assert main([*argv, "--engine", "torch"]) == 0
    one_by_one = capsys.readouterr().out
    assert main([*argv, "--batch-size", "2"]) == 0
    assert capsys.readouterr().out == one_by_one
    assert main([*argv, "--batch-size", "2", "--engine", "numpy"]) == 2
    assert "use --engine torch for a batch" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_compiled_decode(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "--preset", "debug", "--variants", "mha,moe-mla-drope", "--context", "32", "--new-tokens", "4"]
    assert main([*argv, "--compile", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert all(r["compiled"] and r["decode_tokens_per_s"] > 0 for r in rows)


def test_sampling_defaults_have_one_home(trained_debug_run, tmp_path) -> None:
    """CLI flags, generate_ids, the judge's samples, the server's request defaults and an export's
    generation_config.json all say what SamplingConfig says (`moemla generate --top-k` once said None)."""
    import inspect
    import json

    from moemla.cli import build_parser
    from moemla.cli.flags import dataclass_values
    from moemla.eval.samples import SampleSettings
    from moemla.inference.sampling import SamplingConfig

    s = SamplingConfig()
    args = build_parser().parse_args(["generate", "RUN"])
    assert (args.s_temperature, args.s_top_k, args.s_top_p, args.s_max_new_tokens, args.s_seed) == (
        s.temperature, s.top_k, s.top_p, s.max_new_tokens, s.seed
    )  # fmt: skip
    args = build_parser().parse_args(["generate", "RUN", "--top-k", "none"])
    assert args.s_top_k is None  # "none" turns the limit off instead of falling back to the default
    assert inspect.signature(generate_ids).parameters["sampling"].default == s
    assert inspect.signature(generate_ids_batch).parameters["sampling"].default == s
    assert SampleSettings().sampling() == s
    args = build_parser().parse_args(["judge", "RUN", "--offline"])
    assert SampleSettings(**dataclass_values(args, SamplingConfig, "s_")).sampling() == s
    pytest.importorskip("lm_eval")
    from moemla.export.harness import gen_settings

    _, sampled = gen_settings({"do_sample": True}, max_gen_toks=200)
    assert sampled == s  # lm-eval's do_sample requests: SamplingConfig's defaults where gen_kwargs are silent
    pytest.importorskip("fastapi")
    from moemla.serve.protocol import CompletionRequest

    req = CompletionRequest(model="m", prompt="hi")
    assert req.sampling(s.max_new_tokens, s.seed) == s
    pytest.importorskip("transformers")
    from moemla.export.hf import export_hf

    export_hf(trained_debug_run, tmp_path / "hf")
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert {k: gen[k] for k in ("do_sample", "temperature", "top_k", "max_new_tokens")} == s.generation_config()


def test_the_one_decode_loop_gives_each_row_its_tokens_then_one_finish() -> None:
    """decode(): per row, sampled tokens then exactly one Finish (budget, cancel, nothing to do); greedy rows
    equal generate_ids alone; log-probabilities only where asked. No other module steps a decoder."""
    from pathlib import Path

    from moemla.inference.decode import Finish, Row, Token, decode
    from moemla.inference.sampling import SamplingConfig
    from moemla.inference.torch_decoder import TorchDecoder

    model = build("moe-mla-rope")
    rows = [
        Row([5, 9, 23], greedy(5)),
        Row([17, 2], SamplingConfig(max_new_tokens=3, seed=4), logprobs=2),
        Row([8], greedy(0)),
        Row([40, 41], greedy(5)),
    ]
    events = list(decode(TorchDecoder(model), rows, stop=None, cancelled=lambda i: i == 3))
    per_row = [[e for i, e in events if i == r] for r in range(len(rows))]
    for evs in per_row:
        assert isinstance(evs[-1], Finish) and not any(isinstance(e, Finish) for e in evs[:-1])
    assert [e.reason for e in (evs[-1] for evs in per_row)] == ["length", "length", "length", "cancelled"]
    assert [e.id for e in per_row[0][:-1]] == generate_ids(model, [5, 9, 23], greedy(5))
    assert all(e.logprob is None for e in per_row[0] if isinstance(e, Token))
    sampled = [e for e in per_row[1] if isinstance(e, Token)]
    assert len(sampled) == 3 and all(e.logprob is not None and len(e.top) == 2 for e in sampled)
    assert len(per_row[2]) == 1 and len(per_row[3]) == 1
    import ast

    src = Path(__file__).resolve().parent.parent / "src" / "moemla"

    def prefills(path: Path) -> bool:  # a decode loop starts with Decoder.prefill, whatever the decoder is called
        tree = ast.parse(path.read_text())
        # an engine's own prefill may delegate to its session: that is the engine, not a loop over it
        inside = {id(c) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name == "prefill"
                  for c in ast.walk(f)}  # fmt: skip
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "attr", None) == "prefill"]
        return any(id(n) not in inside for n in calls)

    loops = {p.relative_to(src).as_posix() for p in src.rglob("*.py") if prefills(p)}
    # bench times the raw steps; the ONNX export checks its graph's logits against the model's once
    assert loops <= {"inference/decode.py", "inference/bench.py", "inference/onnx/write.py"}, loops
