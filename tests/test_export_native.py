"""The DeepSeek flavor leaves moemla as native transformers folders (issue 43, item 2): DeepSeek-V3 for moe-mla-drope
and mla-drope, Llama for mha-rope, loaded with trust_remote_code=False; logits, greedy and beam-search generate()
with a cache and a left-padded batch, pipeline() and `moemla import` all agree with moemla."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from moemla.cli import main
from moemla.config import FLAVORS
from moemla.export.hf import ExportError, export_hf
from moemla.export.hf_native import interleave
from moemla.inference.generate import generate_ids, generate_ids_batch
from moemla.inference.sampling import greedy

from .conftest import load_run, make_run

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore")

NATIVE = [("moe-mla-drope", "deepseek_v3"), ("mla-drope", "deepseek_v3"), ("mha-rope", "llama")]


@pytest.fixture(scope="module", params=NATIVE, ids=[v for v, _ in NATIVE])
def exported(request: pytest.FixtureRequest, trained_debug_run: Path, tmp_path_factory: pytest.TempPathFactory):
    variant, arch = request.param
    root = tmp_path_factory.mktemp(f"native-{variant}")
    run = make_run(trained_debug_run, root / "run", variant, seed=3, **FLAVORS["deepseek"])
    info = export_hf(run, root / "hf")
    assert info["architecture"] == arch
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(root / "hf"), trust_remote_code=False).eval()
    model, tok, _ = load_run(run)
    return run, root / "hf", hf, model, tok


def test_transformers_loads_it_without_remote_code_and_computes_moemlas_logits(exported) -> None:
    _, folder, hf, model, _ = exported
    assert not list(folder.glob("*.py"))  # no code of ours travels
    config = json.loads((folder / "config.json").read_text())
    assert hf.config.model_type == config["model_type"] in ("deepseek_v3", "llama")
    ids = torch.randint(0, model.cfg.vocab_size, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids)[0], atol=1e-4, rtol=0)
    if config["model_type"] == "deepseek_v3":  # what vLLM needs besides transformers (issue 43, item 3)
        assert config["q_lora_rank"] is None and config["n_group"] == 1 and config["topk_method"] == "noaux_tc"
        assert config["first_k_dense_replace"] == (0 if model.cfg.ffn == "moe" else model.cfg.n_layers)
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" in set(f.keys())  # written out though tied: vLLM reads it


def test_greedy_and_a_left_padded_batch_generate_moemlas_tokens(exported) -> None:
    _, _, hf, model, _ = exported
    prompts = [[5, 9, 23, 40, 7, 81, 3], [17, 2, 60]]
    want = generate_ids_batch(model, prompts, greedy(16))
    assert len(set(want[0])) > 3, "a model this random should not repeat one token"
    alone = hf.generate(torch.tensor([prompts[0]]), max_new_tokens=16, do_sample=False, eos_token_id=None)
    assert alone[0, 7:].tolist() == want[0]
    ids = torch.tensor([prompts[0], [0] * 4 + prompts[1]])
    mask = torch.tensor([[1] * 7, [0] * 4 + [1] * 3])
    got = hf.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, eos_token_id=None)
    assert [row[7:].tolist() for row in got] == want


def _beam_search(model: torch.nn.Module, prompt: list[int], beams: int, new: int) -> list[int]:
    """The reference: beam search over moemla's own logits (no cache), sequences scored by their summed
    log-probabilities; without eos every beam ends at the same length, so the best sum wins."""
    live = [(0.0, list(prompt))]
    for _ in range(new):
        with torch.no_grad():
            logp = model(torch.tensor([ids for _, ids in live]))[0][:, -1].log_softmax(-1)  # (beams, V)
        scores = torch.tensor([s for s, _ in live])[:, None] + logp
        top = scores.flatten().topk(beams)
        v = logp.shape[-1]
        live = [(float(s), [*live[i // v][1], i % v]) for s, i in zip(top.values, top.indices.tolist(), strict=True)]
    return max(live)[1][len(prompt) :]


def test_beam_search_with_the_cache_equals_moemlas(exported) -> None:
    _, _, hf, model, _ = exported
    prompt = [11, 4, 90, 33]
    got = hf.generate(torch.tensor([prompt]), max_new_tokens=8, num_beams=3, do_sample=False, eos_token_id=None,
                      length_penalty=0.0)  # fmt: skip
    assert got[0, len(prompt) :].tolist() == _beam_search(model, prompt, 3, 8)


def test_pipeline_and_autotokenizer_run_the_folder(exported) -> None:
    _, folder, _, model, tok = exported
    assert transformers.AutoTokenizer.from_pretrained(str(folder)).encode("Once upon a time") == tok.encode(
        "Once upon a time").ids  # fmt: skip
    pipe = transformers.pipeline("text-generation", model=str(folder))
    text = "Once upon a time"
    want = generate_ids(model, tok.encode(text).ids, greedy(10))
    assert pipe(text, max_new_tokens=10, do_sample=False, eos_token_id=None)[0]["generated_text"] == text + tok.decode(
        want)  # fmt: skip


def test_import_gives_back_the_same_model(exported, tmp_path: Path) -> None:
    _, folder, _, model, _ = exported
    assert main(["import", str(folder), str(tmp_path / "back")]) == 0
    back, _, _ = load_run(tmp_path / "back")
    assert back.cfg == model.cfg
    for (k, v), (k2, w) in zip(model.state_dict().items(), back.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, w), k


def test_the_rope_rows_are_interleaved_exactly() -> None:
    order = interleave(8)
    assert order.tolist() == [0, 4, 1, 5, 2, 6, 3, 7]  # pairs (i, i + P/2) side by side
    assert torch.argsort(order).tolist() == [0, 2, 4, 6, 1, 3, 5, 7]


def test_a_flavor_a_native_architecture_cannot_express_is_one_line(
    trained_debug_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # DeepSeek's block but the paper's RoPE placement: neither native nor the remote code's
    run = make_run(trained_debug_run, tmp_path / "post", "moe-mla-rope", **FLAVORS["deepseek"])
    assert main(["export", str(run), str(tmp_path / "hf")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--rope-mode post: needs decoupled" in err and not (tmp_path / "hf").exists()
    paper = make_run(trained_debug_run, tmp_path / "paper", "moe-mla-drope")
    with pytest.raises(ExportError, match="--norm layernorm: needs rmsnorm"):
        export_hf(paper, tmp_path / "hf2", architecture="native")
