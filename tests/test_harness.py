"""lm-evaluation-harness: the moemla model scores and generates as moemla itself does."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moemla.inference.generate import generate_ids
from moemla.inference.sampling import greedy

from .conftest import free_port, make_run

pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance

from moemla.export.harness import MoemlaLM


@pytest.fixture(scope="module")
def run(trained_debug_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(trained_debug_run, tmp_path_factory.mktemp("harness") / "model", "moe-mla-rope", seed=5)


def _inst(kind: str, *args: object) -> Instance:
    return Instance(kind, {}, tuple(args), 0)


def test_loglikelihood_is_the_models_log_probability(run: Path) -> None:
    lm = MoemlaLM(run=str(run), device="cpu", batch_size=3)
    model, tok = lm.model, lm.tok
    pairs = [("Once upon a time", " there was a fox."), ("", "Hello"), ("The cat sat on the", " mat"),
             ("A" * 200, " and then")]  # fmt: skip
    got = lm.loglikelihood([_inst("loglikelihood", c, x) for c, x in pairs])
    for (ctx, cont), (lp, is_greedy) in zip(pairs, got, strict=True):
        c_ids, x_ids = lm._pairs(ctx, cont)
        ids = (c_ids + x_ids)[-(model.cfg.max_seq_len + 1) :]
        with torch.no_grad():
            logprobs = model(torch.tensor([ids[:-1]]))[0][0].log_softmax(-1)
        n = len(x_ids)
        want = logprobs[-n:].gather(-1, torch.tensor(ids[-n:])[:, None]).sum()
        assert lp == pytest.approx(float(want), abs=1e-4)
        assert is_greedy == bool((logprobs[-n:].argmax(-1) == torch.tensor(ids[-n:])).all())
        if ctx:  # context and continuation split at a token boundary of the whole text
            assert tok.decode(c_ids + x_ids) == ctx + cont


def test_a_whole_text_scores_as_the_sum_over_its_windows(run: Path) -> None:
    lm = MoemlaLM(run=str(run), device="cpu")
    text = "Lily had a red ball. She took it to the park and played with her friend Tom until the sun went down. " * 3
    ids = lm._encode(text)
    n, span = len(ids), lm.max_length
    assert n > 2 * span  # the rolling windows really roll, and the last one is partial
    [rolling] = lm.loglikelihood_rolling([_inst("loglikelihood_rolling", text)])
    full, total = [lm.eot, *ids], 0.0  # full[j] predicts ids[j]
    for lo in range(0, n, span):  # each token scored once, with as much context as fits in the window
        hi = min(lo + span, n)
        window = full[max(0, hi - span) : hi + 1]
        with torch.no_grad():
            lp = lm.model(torch.tensor([window[:-1]]))[0][0].log_softmax(-1)
        targets = torch.tensor(ids[lo:hi])
        total += float(lp[-len(targets) :].gather(-1, targets[:, None]).sum())
    assert rolling == pytest.approx(total, abs=1e-3)


def test_generate_until_is_greedy_and_stops_at_until(run: Path) -> None:
    lm = MoemlaLM(run=str(run), device="cpu")
    prompts = ["Once upon a time", "The dog", "Tom and Lily went"]
    reqs = [_inst("generate_until", p, {"until": ["<|endoftext|>"], "max_gen_toks": 10}) for p in prompts]
    got = lm.generate_until(reqs)
    for p, text in zip(prompts, got, strict=True):
        ids = generate_ids(lm.model, lm._encode(p), greedy(10), stop=lm.eot)
        assert text == lm.tok.decode([t for t in ids if t != lm.eot])
    cut = got[0][2:4]
    [stopped] = lm.generate_until([_inst("generate_until", prompts[0], {"until": [cut], "max_gen_toks": 10})])
    assert stopped == got[0][: got[0].index(cut)]


TASKS = {
    "moemla_mc": {
        "output_type": "multiple_choice",
        "doc_to_text": "{{context}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{label}}",
        "metric_list": [{"metric": "acc"}],
    },
    "moemla_ppl": {
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "{{text}}",
        "metric_list": [{"metric": "word_perplexity"}, {"metric": "bits_per_byte"}],
    },
    "moemla_gen": {
        "output_type": "generate_until",
        "doc_to_text": "{{context}}",
        "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": ["."], "max_gen_toks": 8, "do_sample": False},
        "metric_list": [{"metric": "exact_match"}],
    },
}


def _write_tasks(folder: Path) -> None:
    """TASKS over four one-sentence documents, as YAML files lm-eval reads with --include_path."""
    docs = folder / "docs.jsonl"
    stories = ["Lily found a red ball.", "Tom saw a big dog.", "The cat slept in the sun.", "Ben ate an apple."]
    with docs.open("w") as f:
        for i, s in enumerate(stories):
            doc = {"context": s.split()[0], "choices": [" " + " ".join(s.split()[1:]), " banana"], "label": 0}
            f.write(json.dumps(doc | {"text": s, "answer": s.split(" ", 1)[1], "id": i}) + "\n")
    for name, spec in TASKS.items():
        task = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(docs)}},
                "test_split": "test", **spec}  # fmt: skip
        (folder / f"{name}.yaml").write_text(json.dumps(task))  # JSON is YAML


def _lm_eval(argv: list[str], tasks: list[str], folder: Path) -> dict:
    out = folder / f"results-{len(list(folder.glob('results-*')))}"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(folder / "cache"))
    cmd = [
        *argv,
        "--device",
        "cpu",
        "--tasks",
        ",".join(tasks),
        "--include_path",
        str(folder),
        "--output_path",
        str(out),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [result_file] = list(out.rglob("results*.json"))
    return json.loads(result_file.read_text())["results"]


@pytest.fixture(scope="module")
def direct(run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    """`moemla lm-eval --model moemla` once over every task: its results and its results file."""
    folder = tmp_path_factory.mktemp("lm-eval")
    _write_tasks(folder)
    argv = [sys.executable, "-m", "moemla", "lm-eval", "--model", "moemla", "--model_args", f"run={run}"]
    results = _lm_eval(argv, list(TASKS), folder)
    [result_file] = list((folder / "results-0").rglob("results*.json"))
    return results, result_file


def test_lm_eval_command_runs_local_tasks_on_a_debug_model(direct: tuple[dict, Path], run: Path) -> None:
    """`moemla lm-eval --model moemla` end to end, on tasks whose data is local (the hub is not reachable)."""
    results, result_file = direct
    assert 0.0 <= results["moemla_mc"]["acc,none"] <= 1.0
    assert results["moemla_ppl"]["bits_per_byte,none"] > 0
    assert 0.0 <= results["moemla_gen"]["exact_match,none"] <= 1.0
    assert result_file.parent.name.endswith(run.name)  # named after the run, not a random id


def test_lm_eval_local_completions_against_moemla_serve_scores_the_same(
    run: Path, direct: tuple[dict, Path], tmp_path: Path
) -> None:
    """lm-eval's OpenAI backend, through `moemla serve` and the exported tokenizer, equals --model moemla."""
    pytest.importorskip("tenacity")  # lm-eval's API models need lm-eval[api]
    pytest.importorskip("transformers")
    from moemla.export.hf import export_hf

    _write_tasks(tmp_path)
    export_hf(run, tmp_path / "hf")
    port = free_port()
    cmd = [sys.executable, "-m", "moemla", "serve", str(run), "--port", str(port), "--device", "cpu"]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        args = (f"model={run.name},base_url=http://127.0.0.1:{port}/v1/completions,tokenizer_backend=huggingface,"
                f"tokenizer={tmp_path / 'hf'},trust_remote_code=True")  # fmt: skip
        served = _lm_eval(["lm_eval", "--model", "local-completions", "--model_args", args], ["moemla_ppl"], tmp_path)
    finally:
        server.terminate()
        server.wait(timeout=20)
    got, want = served["moemla_ppl"]["bits_per_byte,none"], direct[0]["moemla_ppl"]["bits_per_byte,none"]
    assert got == pytest.approx(want, rel=1e-4)


def test_bare_lm_eval_runs_an_exported_folder_with_its_hf_backend(
    run: Path, direct: tuple[dict, Path], tmp_path: Path
) -> None:
    """`lm_eval --model hf --model_args pretrained=EXPORT,trust_remote_code=True` scores as --model moemla."""
    pytest.importorskip("accelerate")  # lm-eval's hf backend needs it
    from moemla.export.hf import export_hf

    _write_tasks(tmp_path)
    export_hf(run, tmp_path / "hf")
    args = f"pretrained={tmp_path / 'hf'},trust_remote_code=True,dtype=float32"
    hf = _lm_eval(["lm_eval", "--model", "hf", "--model_args", args], ["moemla_ppl"], tmp_path)
    got, want = hf["moemla_ppl"]["bits_per_byte,none"], direct[0]["moemla_ppl"]["bits_per_byte,none"]
    assert got == pytest.approx(want, rel=1e-4)
