"""A run folder: run.json (model config, train config, data), tokenizer.json, metrics.jsonl, checkpoints/."""

from __future__ import annotations

import json
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


def load_model(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[Transformer, Tokenizer, dict]:
    """The newest checkpoint's model in eval mode, the run's tokenizer and its run.json."""
    meta = read_meta(run_dir)
    cfg, _ = configs(meta)
    path = checkpoint.latest(run_dir)
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
