"""The ONNX export: the graph equals the model for every portable variant, its cache keeps the model's layout, the
engine decodes it everywhere the project decodes, and bad input is one line with nothing half-written."""

import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import numpy as np
import pytest
import torch

from moemla import accounting
from moemla.cli import main
from moemla.config import FLAVORS, ConfigError, ModelConfig

from .conftest import ALL_VARIANTS, build

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from moemla.inference.generate import generate_ids, generate_ids_batch
from moemla.inference.onnx.engine import OnnxDecoder
from moemla.inference.onnx.write import write_onnx
from moemla.inference.sampling import SamplingConfig, greedy
from moemla.inference.torch_decoder import TorchDecoder
from moemla.model.kv_cache import cache_spec

# every portable variant, and the routing bias outside the gate (DeepSeek-V3) as well as in it; a context of 128
# leaves room for 64 cached steps after a prompt. The default run exports one variant of each graph shape (MHA with
# learned and rotary positions, MLA with post and decoupled RoPE, dense and MoE): an MLA graph whose steps are
# absorbed takes ~15 s to trace (torch.export compiles both branches of its If), so the rest run with -m slow.
FAST = {"mha", "mla-rope", "moe-mha-rope", "moe-mla-drope"}
# DeepSeek-V3's block (issue 43): the graph calls the model's own functions, so every block switch exports with no
# code of its own; DeepSeek-V3 itself (moe-mla-drope) in the default run, Llama (mha-rope) and the rest with -m slow
DEEPSEEK = [("moe-mla-drope", FLAVORS["deepseek"]), *[(v, FLAVORS["deepseek"]) for v in ("mha-rope", "mla-rope",
            "moe-mha", "moe-mla")]]  # fmt: skip
CASES = [
    pytest.param((v, o), id=v + ("-deepseek" if o.get("norm") else "-v3-gate" if o else ""),
                 marks=() if (v in FAST and not o) or (v, o) == DEEPSEEK[0] else pytest.mark.slow)
    for v, o in [(v, {}) for v in ALL_VARIANTS] + [("moe-mla-drope", {"bias_in_gate": False}), *DEEPSEEK]
]  # fmt: skip


def _model(variant: str, **overrides: object) -> torch.nn.Module:
    model = build(variant, max_seq_len=128, **overrides)
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.router.bias.normal_(0.0, 0.05)  # a trained bias, so that routing with and without it differs
    return model


@pytest.fixture(scope="module", params=CASES)
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    variant, overrides = request.param
    model = _model(variant, **overrides)
    out = tmp_path_factory.mktemp("onnx") / variant
    write_onnx(model, out)
    return model, out


def test_the_graph_equals_the_model_over_a_padded_prefill_and_64_cached_steps(exported: tuple) -> None:
    model, out = exported
    dec, ref = OnnxDecoder(out), TorchDecoder(model)
    prompts = [[5, 9, 23, 7, 8, 1, 2], [17, 2, 4], [40]]
    got, want = dec.prefill(prompts, 128), ref.prefill(prompts, 128)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    gen = torch.Generator().manual_seed(1)
    for _ in range(64):
        tokens = torch.randint(0, model.cfg.vocab_size, (3,), generator=gen).tolist()
        torch.testing.assert_close(dec.step(tokens), ref.step(tokens), atol=1e-4, rtol=0)
    # the cache holds what the model caches, byte for byte: MLA's latents, not expanded K and V
    per_token = dec.cache_nbytes / (3 * dec.length)
    assert per_token == accounting.kv_cache_bytes_per_token(model.cfg)


def test_cached_and_uncached_runs_of_the_file_agree_and_greedy_tokens_equal(exported: tuple) -> None:
    model, out = exported
    dec = OnnxDecoder(out)
    ids = [3, 14, 15, 92, 65, 35, 89, 79]
    whole = dec.logits(ids)  # (T, V) in one prefill
    dec.prefill([ids[:2]])
    stepped = [dec.logits(ids[:2])[-1]]
    dec.prefill([ids[:2]])
    stepped += [dec.step([t])[0] for t in ids[2:]]
    torch.testing.assert_close(torch.stack(stepped), whole[1:], atol=1e-4, rtol=0)
    assert generate_ids(dec, [5, 9, 23], greedy(20)) == generate_ids(model, [5, 9, 23], greedy(20))
    sampled = SamplingConfig(temperature=1.0, top_k=None, top_p=0.9, max_new_tokens=12)
    prompts = [[5, 9, 23], [1, 2]]
    assert generate_ids_batch(dec, prompts, sampled) == generate_ids_batch(model, prompts, sampled)


def test_the_manifest_says_how_to_run_the_graph(exported: tuple) -> None:
    model, out = exported
    manifest = json.loads((out / "manifest.json").read_text())
    assert ModelConfig.from_dict(manifest["config"]) == model.cfg
    assert manifest["kv_cache_bytes_per_token"] == accounting.kv_cache_bytes_per_token(model.cfg)
    assert manifest["sampling"]["top_k"] == SamplingConfig().top_k and manifest["sampling"]["top_p"] is None
    names = [c["past"] for c in manifest["cache"]]
    assert manifest["inputs"] == ["input_ids", "attention_mask", "logits_at", *names]
    per_token = sum(int(np.prod([n for n in c["shape"] if isinstance(n, int)])) * 4 for c in manifest["cache"])
    assert per_token == manifest["kv_cache_bytes_per_token"]
    if model.cfg.attention == "mla":  # only the latents (one joint, or C^K and C^V) and the RoPE key
        assert all(c["past"].split(".")[-1] in ("c_k", "c_v", "c_kv", "k_pe") for c in manifest["cache"])
        assert [c["past"].split(".")[-1] for c in manifest["cache"][: len(cache_spec(model.cfg))]] == list(
            cache_spec(model.cfg))  # fmt: skip


def test_top_p_routing_is_refused_in_one_line(tmp_path: Path) -> None:
    model = build("moe-mla-rope", routing="top-p")
    with pytest.raises(ConfigError, match="routing='top-p'"):
        write_onnx(model, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("quantize", ["int8", pytest.param("int4", marks=pytest.mark.slow)])
def test_quantized_exports_run_and_report_their_agreement(quantize: str, tmp_path: Path) -> None:
    model = _model("moe-mha-rope", dim=64, vocab_size=1024)
    manifest = write_onnx(model, tmp_path / quantize, quantize=quantize)
    # measured: int8 1.1e-2, int4 8.1e-2 from the fp32 logits, the same top-1 token at every checked position; a
    # graph that was not quantized (fp32 differs by ~1e-7) or that is broken (a wrong token) fails here
    bound = {"int8": 0.05, "int4": 0.3}[quantize]
    check = manifest["check"]
    assert manifest["quantize"] == quantize and 1e-4 < check["max_abs_logit_error"] < bound, check
    assert check["top1_agreement"] >= 0.9, check
    dec = OnnxDecoder(tmp_path / quantize)
    assert len(generate_ids(dec, [5, 9, 23], greedy(10))) == 10
    # the dense matrices (the LM head the largest) are smaller; the routers and the experts stay fp32
    assert manifest["files"]["model.onnx"] < 0.8 * accounting.total_params(model.cfg) * 4


@pytest.fixture(scope="module")
def cli_export(trained_debug_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`moemla export RUN OUT --format onnx` of the trained debug run."""
    out = tmp_path_factory.mktemp("cli") / "onnx"
    assert main(["export", str(trained_debug_run), str(out), "--format", "onnx"]) == 0
    return out


def test_export_cli_then_generate_and_serve_the_folder(trained_debug_run: Path, cli_export: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    out = cli_export
    assert (out / "run_onnx.py").is_file() and (out / "tokenizer.json").is_file()
    argv = ["--prompt", "Once upon a time", "--max-new-tokens", "12", "--temperature", "0"]
    assert main(["generate", str(trained_debug_run), "--engine", "torch", "--device", "cpu", *argv]) == 0
    want = capsys.readouterr().out
    assert main(["generate", str(out), *argv]) == 0
    assert capsys.readouterr().out == want
    # moemla eval on the export: the run's own validation windows, the model's loss through onnxruntime
    evals = []
    for path in (trained_debug_run, out):
        assert main(["eval", str(path), "--max-tokens", "2048", "--batch-size", "4", "--device", "cpu", "--json"]) == 0
        evals.append(json.loads(capsys.readouterr().out))
    assert evals[1]["tokens"] == evals[0]["tokens"]
    assert evals[1]["val_loss"] == pytest.approx(evals[0]["val_loss"], abs=1e-4)
    # the server's engine: the same greedy tokens per request on the ONNX engine as on the torch engine
    import queue

    from moemla.runs import RunFolder
    from moemla.serve.engine import Engine, Finish, Job, Token

    model = RunFolder.open(trained_debug_run).load_model("cpu")
    prompts = [[5, 9, 23], [17, 2, 60, 61, 62], [8]]
    tokens = {}
    for name, engine in (("torch", Engine(model, None, window_s=0.2)), ("onnx", Engine(OnnxDecoder(out), None))):
        events: queue.Queue = queue.Queue()
        jobs = [Job(p, greedy(10), lambda e, i=i, q=events: q.put((i, e)), logprobs=2) for i, p in enumerate(prompts)]
        engine.submit(jobs)
        got: dict[int, list] = {0: [], 1: [], 2: []}
        done = 0
        while done < 3:
            i, event = events.get(timeout=60)
            if isinstance(event, Token):
                got[i].append(event.id)
            done += isinstance(event, Finish)
        engine.close()
        tokens[name] = got
    assert tokens["onnx"] == tokens["torch"]


def test_bad_export_folders_are_one_line_and_nothing_is_half_written(
    trained_debug_run: Path, cli_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    out = tmp_path / "onnx"
    shutil.copytree(cli_export, out)
    assert main(["export", str(trained_debug_run), str(out), "--format", "onnx"]) == 1  # not empty
    assert "--overwrite" in capsys.readouterr().err
    # a failure mid-export leaves the old folder as it was and no temporary folder behind
    import moemla.inference.onnx.write as write

    def broken(_: object, path: Path) -> None:
        path.write_bytes(b"half a graph")
        raise ConfigError("the export failed")

    monkeypatch.setattr(write, "export_graph", broken)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["export", str(trained_debug_run), str(out), "--format", "onnx", "--overwrite"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == before and (out / "model.onnx").is_file()
    monkeypatch.undo()
    capsys.readouterr()
    model = out / "model.onnx"
    model.write_bytes(model.read_bytes()[:1000])  # truncated
    assert main(["generate", str(out), "--prompt", "Once"]) == 2
    err = capsys.readouterr().err
    assert "model.onnx has 1,000 bytes" in err and len(err.strip().splitlines()) == 1
    model.unlink()
    assert main(["generate", str(out), "--prompt", "Once"]) == 2
    assert "model.onnx is missing" in capsys.readouterr().err
    assert main(["generate", str(out), "--prompt", "a " * 200]) == 2  # the manifest is checked before the prompt
    (out / "manifest.json").write_text("{")
    assert main(["generate", str(out), "--prompt", "Once"]) == 2
    assert "manifest.json is not valid JSON" in capsys.readouterr().err


def test_a_prompt_longer_than_the_context_is_the_one_fit_message(exported: tuple) -> None:
    model, out = exported
    with pytest.raises(ValueError, match="shorten the prompt"):
        generate_ids(OnnxDecoder(out), [1] * model.cfg.max_seq_len, greedy(4))


def test_the_engine_imports_and_decodes_without_torch(exported: tuple) -> None:
    _, out = exported
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from moemla.inference.onnx.engine import OnnxDecoder\n"
        f"d = OnnxDecoder({str(out)!r})\n"
        "print(d.session.prefill([[5, 9, 23]]).argmax(-1)[0], d.session.step([4]).shape)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
def test_the_example_runner_needs_only_numpy_onnxruntime_and_tokenizers(
    trained_debug_run: Path, tmp_path: Path
) -> None:
    out = tmp_path / "onnx"
    assert main(["export", str(trained_debug_run), str(out), "--format", "onnx"]) == 0
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    subprocess.run([py, "-m", "pip", "install", "-q", "numpy", "onnxruntime", "tokenizers"], check=True, timeout=900)
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    done = subprocess.run([py, out / "run_onnx.py", "Once upon a time", "--max-new-tokens", "12", "--temperature", "0"],
                          capture_output=True, text=True, timeout=300, env=clean, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    listed = subprocess.run([py, "-m", "pip", "list"], capture_output=True, text=True).stdout.lower()
    assert "torch" not in listed and "moemla" not in listed
    model, tok = make_run_model(trained_debug_run)
    ids = tok.encode("Once upon a time").ids
    want = tok.decode([t for t in generate_ids(model, ids, greedy(12), stop=tok.token_to_id("<|endoftext|>"))])
    assert done.stdout.strip() == ("Once upon a time" + want).strip()


def make_run_model(run: Path) -> tuple:
    from moemla.runs import RunFolder

    folder = RunFolder.open(run)
    return folder.load_model("cpu"), folder.tokenizer()
