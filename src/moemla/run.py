"""A run folder: run.json (model config, train config, data), tokenizer.json, metrics.jsonl, checkpoints/."""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import torch
from tokenizers import Tokenizer

from moemla.config import ModelConfig
from moemla.data.tokenizer import load_tokenizer
from moemla.model import Transformer
from moemla.train import checkpoint
from moemla.train.config import TrainConfig

RUN_FILE, METRICS_FILE, TOKENIZER_FILE = "run.json", "metrics.jsonl", "tokenizer.json"


class RunError(ValueError):
    """A run folder that cannot be used; the message says why and what to do."""


LOCK_FILE = ".lock"


@contextlib.contextmanager
def lock_run(run_dir: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on a run folder; a second process on it gets a RunError at once.

    The lock is an flock on RUN/.lock, which the kernel drops when its process dies, so the lock of a
    killed run never blocks the resume. (Where flock is missing, on Windows, nothing is locked.)
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    folder = Path(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / LOCK_FILE).open("a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise RunError(
                f"{folder} is in use by {holder}; wait for it to finish or stop it (two writers would interleave "
                "its metrics and checkpoints)"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"process {os.getpid()} on {socket.gethostname()}")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read_meta(run_dir: str | Path) -> dict:
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        raise RunError(f"{run_dir} is not a moemla run folder (no {RUN_FILE}); train one with `moemla train`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise RunError(f"{path} is corrupt ({err})") from None


def configs(meta: dict) -> tuple[ModelConfig, TrainConfig]:
    return ModelConfig.from_dict(meta["model"]), TrainConfig.from_dict(meta["train"])


def load_model(
    run_dir: str | Path, device: str | torch.device = "cpu", checkpoint_name: str | None = None
) -> tuple[Transformer, Tokenizer, dict]:
    """A checkpoint's model in eval mode (the newest, or `checkpoint_name`: step_N), the tokenizer and run.json."""
    meta = read_meta(run_dir)
    cfg, _ = configs(meta)
    path = checkpoint.find(run_dir, checkpoint_name)
    if path is None:
        raise RunError(f"{run_dir} has no checkpoint yet; train it (or let training reach its first checkpoint)")
    model = Transformer(cfg)
    checkpoint.load_weights(path, model)
    tok = load_tokenizer(str(Path(run_dir) / TOKENIZER_FILE))
    return model.to(device).eval(), tok, meta


def finished(run_dir: str | Path, steps: int) -> bool:
    """The run's newest checkpoint has reached `steps` (checkpoint.latest is None for a missing folder)."""
    ckpt = checkpoint.latest(run_dir)
    return ckpt is not None and json.loads((ckpt / checkpoint.STATE).read_text())["step"] >= steps


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
