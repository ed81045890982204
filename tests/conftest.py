import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from moemla import ModelConfig, Transformer
from moemla.config import FLAVORS, VARIANTS
from moemla.runs import RunFolder, checkpoint

ALL_VARIANTS = list(VARIANTS)
# the block's switches (issue 43): each alone, then DeepSeek-V3's block (all of them, no biases, the bias outside
# the gate); every engine that runs them is held to the torch model over all of them
BLOCKS = {
    "rmsnorm": {"norm": "rmsnorm"},
    "swiglu": {"ffn_activation": "swiglu"},
    "joint": {"latent": "joint"},
    "sigmoid": {"scoring": "sigmoid"},
    "deepseek": FLAVORS["deepseek"],
}

if "PYTEST_XDIST_WORKER_COUNT" in os.environ:  # pytest -n N: share the cores, or N x threads oversubscribe them
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def build(variant: str, size: str = "debug", seed: int = 0, **overrides: object) -> Transformer:
    """A model in eval mode with dropout off, so two forwards are comparable."""
    torch.manual_seed(seed)
    cfg = ModelConfig.from_preset(size, variant, dropout=0.0, **overrides)
    return Transformer(cfg).eval()


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


def make_run(base: Path, out: Path, variant: str, seed: int = 0, **overrides: object) -> Path:
    """A run folder like `base` holding a `variant` model with weights and routing biases far from their init."""
    out.mkdir()
    meta = json.loads((base / "run.json").read_text())
    cfg = ModelConfig.from_preset("debug", variant, vocab_size=meta["model"]["vocab_size"], dropout=0.0, **overrides)
    meta["model"] = cfg.to_dict()
    (out / "run.json").write_text(json.dumps(meta))
    shutil.copy(base / "tokenizer.json", out / "tokenizer.json")
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.4)  # varied greedy continuations, not one repeated token
        for moe in model.moe_layers():
            moe.router.bias.normal_(0.0, 0.05)
    checkpoint.save(out, 1, model, {}, {"step": 1}, keep=1)
    return out


@pytest.fixture(scope="session")
def trained_debug_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real run folder (run.json, tokenizer, checkpoint) of a debug model trained one step on the built-in corpus."""
    from moemla.cli import main

    root = tmp_path_factory.mktemp("debug-run")
    data, run = root / "data", root / "run"
    assert main(["prepare", "--stories", "300", "--vocab-size", "300", "--out", str(data)]) == 0
    train = ["--max-steps", "1", "--batch-size", "2", "--micro-batch-size", "2", "--seq-len", "32"]
    assert main(["train", "--data", str(data), "--out", str(run), "--preset", "debug", *train]) == 0
    return run


def load_run(run: Path, checkpoint: str | None = None) -> tuple[Transformer, object, dict]:
    """(model in eval mode, tokenizer, run.json) of a run folder, as every reading wing opens it."""
    folder = RunFolder.open(run)
    return folder.load_model("cpu", checkpoint), folder.tokenizer(), folder.meta


@contextlib.contextmanager
def serving_cli(folder: Path, *flags: str) -> Iterator[int]:
    """`moemla serve FOLDER FLAGS` in a process of its own on a free loopback port; yields the port once its /health
    answers, stops the process after."""
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "moemla", "serve", str(folder), "--port", str(port), *flags]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(300):
            try:
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stdout.read()
                time.sleep(0.1)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
