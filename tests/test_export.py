"""moemla export --format hf: transformers computes the same logits and greedy tokens as moemla, every variant."""

import ast
import builtins
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from moemla.cli import main
from moemla.config import VARIANTS, ModelConfig
from moemla.data.sources import EOT
from moemla.export.hf import REMOTE, ExportError, export_hf, native_architecture
from moemla.inference.generate import generate_ids, generate_ids_batch
from moemla.inference.sampling import greedy

from .conftest import load_run, make_run

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def base_run(trained_debug_run: Path) -> Path:
    return trained_debug_run  # moe-mla-rope, trained one step


def load_hf(folder: Path, remote: bool = True) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=remote).eval()


def assert_hf_matches_moemla(hf: torch.nn.Module, model: torch.nn.Module, row: int, prompt_len: int, new: int) -> list:
    """Equal logits on two random rows of 24 tokens, then equal greedy tokens after row `row`'s first
    `prompt_len` ones; returns moemla's greedy tokens."""
    ids = torch.randint(0, model.cfg.vocab_size, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids)[0], atol=1e-4, rtol=0)
    prompt = ids[row, :prompt_len].tolist()
    want = generate_ids(model, prompt, greedy(new))
    got = hf.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False, eos_token_id=None)
    assert got[0, len(prompt) :].tolist() == want
    return want


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_remote_code_logits_and_greedy_tokens_match_moemla(variant: str, base_run: Path, tmp_path: Path) -> None:
    run = make_run(base_run, tmp_path / "run", variant)
    info = export_hf(run, tmp_path / "hf", architecture="remote")
    assert info["architecture"] == "remote"
    hf = load_hf(tmp_path / "hf")
    model, _, _ = load_run(run)
    want = assert_hf_matches_moemla(hf, model, row=0, prompt_len=7, new=16)
    assert len(set(want)) > 3, "a model this random should not repeat one token"


@pytest.mark.parametrize("variant", ["mha", "moe-mla-rope", "mla-rope", "moe-mla-drope"])
def test_left_padded_batch_matches_each_prompt_alone(variant: str, base_run: Path, tmp_path: Path) -> None:
    """attention_mask marks left padding; positions count from each sequence's first real token, as in moemla."""
    run = make_run(base_run, tmp_path / "run", variant, seed=1)
    export_hf(run, tmp_path / "hf", architecture="remote")
    hf = load_hf(tmp_path / "hf")
    model, _, _ = load_run(run)
    prompts = [[5, 9, 23, 40, 7, 81, 3], [17, 2, 60]]
    mask = torch.tensor([[1] * 7, [0] * 4 + [1] * 3])
    ids = torch.tensor([prompts[0], [0] * 4 + prompts[1]])
    with torch.no_grad():
        padded = hf(ids, attention_mask=mask).logits
        alone = hf(torch.tensor([prompts[1]])).logits
    torch.testing.assert_close(padded[1, 4:], alone[0], atol=1e-4, rtol=0)
    want = generate_ids_batch(model, prompts, greedy(10))
    got = hf.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=None)
    assert [row[7:].tolist() for row in got] == want


def _no_prompt(*_: object) -> str:
    raise AssertionError("transformers asked an interactive question")


@pytest.mark.parametrize("variant", ["mha", "moe-mla-rope", "mla-rope"])
def test_pipeline_text_generation_equals_moemla_greedy_text(
    variant: str, base_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a user runs: pipeline() over the folder, its tokenizer and cached generate(), greedy."""
    monkeypatch.setattr(builtins, "input", _no_prompt)
    run = make_run(base_run, tmp_path / "run", variant, seed=4)
    export_hf(run, tmp_path / "hf", architecture="remote")
    pipe = transformers.pipeline("text-generation", model=str(tmp_path / "hf"), trust_remote_code=True)
    model, tok, _ = load_run(run)
    text = "Once upon a time"
    want = generate_ids(model, tok.encode(text).ids, greedy(12))
    got = pipe(text, max_new_tokens=12, do_sample=False, eos_token_id=None)[0]["generated_text"]
    assert got == text + tok.decode(want)


def test_readme_hf_example_runs_as_written_and_equals_moemla(
    base_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/interop.md's export example: a left-padded batch through the folder's own tokenizer, loaded without
    remote code."""
    readme = (Path(__file__).resolve().parent.parent / "docs" / "interop.md").read_text()
    section = readme[readme.index("## `moemla export RUN OUT --format hf`") :]
    code = re.search(r"```py\n(.*?)```", section, flags=re.S).group(1)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(builtins, "input", _no_prompt)
    run = make_run(base_run, tmp_path / "run", "moe-mla-rope", seed=5, max_seq_len=128)  # room for 60 new tokens
    export_hf(run, Path("hf/moe-mla-rope"))
    scope: dict[str, object] = {}
    exec(compile(code, "README.md", "exec"), scope)
    model, tok, _ = load_run(run)
    eot = tok.token_to_id(EOT)
    prompts = [tok.encode(t).ids for t in ["Once upon a time", "The little fox"]]
    want = generate_ids_batch(model, prompts, greedy(60), stop=eot)
    longest = scope["batch"]["input_ids"].shape[1]
    got = [row[longest:].tolist() for row in scope["out"]]
    # generate() pads a finished row with the pad token (also <|endoftext|>); moemla's row ends at its stop
    assert [row[: len(w)] for row, w in zip(got, want, strict=True)] == want
    assert all(t == eot for row, w in zip(got, want, strict=True) for t in row[len(w) :])


@pytest.mark.parametrize(("variant", "arch"), [("mha", "gpt2"), ("mha-rope", "gpt_neox")])
def test_dense_baselines_export_to_native_architectures_without_remote_code(
    variant: str, arch: str, base_run: Path, tmp_path: Path
) -> None:
    run = make_run(base_run, tmp_path / "run", variant, seed=2)
    info = export_hf(run, tmp_path / "hf")
    assert info["architecture"] == arch
    assert not (tmp_path / "hf" / "modeling_moemla.py").exists()
    hf = load_hf(tmp_path / "hf", remote=False)
    assert hf.config.model_type == arch
    model, _, _ = load_run(run)
    # GPT-NeoX's rotate_half pairs the same channels as moemla's RoPE: proved by equal logits
    assert_hf_matches_moemla(hf, model, row=1, prompt_len=5, new=12)


def test_native_is_refused_where_no_architecture_is_exact(base_run: Path, tmp_path: Path) -> None:
    assert native_architecture(ModelConfig.from_preset("debug", "moe-mla-rope")) is None
    assert native_architecture(ModelConfig.from_preset("debug", "mha", bias=False)) is None
    with pytest.raises(ExportError, match="no exact native"):
        export_hf(base_run, tmp_path / "hf", architecture="native")


def test_bf16_export_keeps_the_routing_bias_in_fp32(base_run: Path, tmp_path: Path) -> None:
    export_hf(base_run, tmp_path / "hf", dtype="bfloat16")
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118
    assert dtypes["model.blocks.0.ffn.router.bias"] == "F32"
    assert dtypes["model.blocks.0.ffn.router.weight"] == "F32"
    assert dtypes["model.blocks.0.ffn.experts.w1"] == "BF16"
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "hf"), trust_remote_code=True, dtype=torch.bfloat16
    )
    assert hf.model.blocks[0].ffn.router.bias.dtype == torch.float32
    assert hf.model.blocks[0].ffn.experts.w1.dtype == torch.bfloat16
    model, _, _ = load_run(base_run)
    torch.testing.assert_close(hf.model.blocks[1].ffn.router.bias, model.blocks[1].ffn.router.bias, atol=0, rtol=0)


def test_folder_carries_tokenizer_generation_config_and_self_contained_code(base_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "hf"
    assert main(["export", str(base_run), str(out)]) == 0
    tok = transformers.PreTrainedTokenizerFast.from_pretrained(str(out))  # no remote code, no question
    _, ours, _ = load_run(base_run)
    text = "Once upon a time, a little fox found a red ball."
    assert tok(text)["input_ids"] == ours.encode(text).ids
    assert tok.eos_token == EOT and tok.padding_side == "left"
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == ours.token_to_id(EOT) and gen["do_sample"]
    for name in ("modeling_moemla.py", "configuration_moemla.py"):  # Hub users will not have moemla installed
        tree = ast.parse((REMOTE / name).read_text())
        modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        modules |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert all(m.split(".")[0] in ("__future__", "torch", "transformers", "configuration_moemla") for m in modules)
    assert (out / "modeling_moemla.py").read_text() == (REMOTE / "modeling_moemla.py").read_text()
    for weights in (out / "model.safetensors", *base_run.glob("checkpoints/*/model.safetensors")):
        assert weights.stat().st_mode & 0o044 == 0o044, f"{weights} is not readable by others, unlike its folder"


def test_export_errors_are_one_line(base_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert main(["export", str(base_run), str(tmp_path / "full")]) == 1
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "full" / "keep.txt").exists()
    assert main(["export", str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 1
    assert "not a moemla run folder" in capsys.readouterr().err
    assert main(["export", str(base_run), str(tmp_path / "out"), "--architecture", "native"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--architecture remote" in err


@pytest.mark.parametrize(("variant", "arch"), [("moe-mla-drope", "auto"), ("mha", "auto"), ("mha-rope", "auto")])
def test_import_gives_back_the_same_model_as_a_run(variant: str, arch: str, base_run: Path, tmp_path: Path) -> None:
    """export -> import is the identity on weights and tokenizer, for remote code, GPT-2 and GPT-NeoX alike."""
    run = make_run(base_run, tmp_path / "run", variant, seed=6)
    export_hf(run, tmp_path / "hf", architecture=arch, dtype="float32")
    assert main(["import", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    a, tok_a, _ = load_run(run)
    b, tok_b, meta = load_run(tmp_path / "back")
    assert a.cfg == b.cfg and tok_a.to_str() == tok_b.to_str()
    for (k, v), (k2, w) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, w), k
    assert meta["data"]["tokenizer_sha256"] == json.loads((run / "run.json").read_text())["data"]["tokenizer_sha256"]
    assert main(["import", str(tmp_path / "hf"), str(tmp_path / "back")]) == 1  # not empty


def test_an_imported_run_fine_tunes_with_a_fresh_optimizer(trained_debug_run: Path, tmp_path: Path) -> None:
    export_hf(trained_debug_run, tmp_path / "hf")
    assert main(["import", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    data = json.loads((trained_debug_run / "run.json").read_text())["data"]["path"]
    argv = ["train", "--data", data, "--out", str(tmp_path / "back"), "--resume", "--max-steps", "1",
            "--batch-size", "2", "--micro-batch-size", "2", "--seq-len", "32"]  # fmt: skip
    assert main(argv) == 0
    assert (tmp_path / "back" / "checkpoints" / "step_00000001").is_dir()


def test_import_of_truncated_weights_or_a_config_that_does_not_fit_is_one_line(
    base_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    export_hf(base_run, tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    assert main(["import", str(tmp_path / "hf"), str(tmp_path / "a")]) == 1
    err = capsys.readouterr().err
    assert "model.safetensors is truncated" in err and err.count("\n") == 1 and "Traceback" not in err
    weights.write_bytes(good)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["moemla_config"]["dim"] *= 2
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    assert main(["import", str(tmp_path / "hf"), str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err
    assert "do not fit its moemla_config" in err and err.count("\n") == 1
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_remote_export_and_cpu_engine_refuse_the_same_unimplemented_fields(
    base_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lists in config (PORTABLE: the remote code; CPU_PORTABLE: the CPU engine, PORTABLE plus the DeepSeek
    block's switches) say what the second implementations implement; both refuse the rest."""
    import moemla.config
    from moemla.config import ConfigError
    from moemla.inference.cpu.decoder import NumpyDecoder

    run = make_run(base_run, tmp_path / "run", "moe-mla-rope", bias_in_gate=False)
    export_hf(run, tmp_path / "ok")  # implemented: exports
    for table in (moemla.config.PORTABLE, moemla.config.CPU_PORTABLE):  # as if a new field nobody ported yet
        monkeypatch.delitem(table, "bias_in_gate")
    with pytest.raises(ExportError, match=r"remote code does not implement ModelConfig.bias_in_gate=False"):
        export_hf(run, tmp_path / "hf")
    model, _, _ = load_run(run)
    with pytest.raises(ConfigError, match=r"CPU engine does not implement ModelConfig.bias_in_gate=False"):
        NumpyDecoder(model.cfg, model.state_dict())


def test_top_p_routing_is_refused_by_the_export_and_the_cpu_engine_and_auto_picks_torch(
    base_run: Path, tmp_path: Path
) -> None:
    """Dynamic expert selection runs in the torch model and decoder only; the second implementations say so."""
    from moemla.config import ConfigError
    from moemla.inference.decoder import make_decoder
    from moemla.inference.torch_decoder import TorchDecoder

    run = make_run(base_run, tmp_path / "run", "moe-mla-rope", routing="top-p", routing_p=0.5)
    with pytest.raises(ExportError, match=r"does not implement ModelConfig.routing='top-p'"):
        export_hf(run, tmp_path / "hf")
    model, _, _ = load_run(run)
    with pytest.raises(ConfigError, match=r"CPU engine does not implement ModelConfig.routing='top-p'; use --engine"):
        make_decoder(model, "numba")
    assert isinstance(make_decoder(model, "auto"), TorchDecoder)
