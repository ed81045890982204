"""Checkpoints: safetensors weights, JSON run state, optimizer and RNG states loaded with weights_only.

Layout: RUN/checkpoints/step_00000100/{model.safetensors, optimizer.pt, state.json} and
RUN/checkpoints/latest naming the newest complete one. A checkpoint is written into a temporary
folder and renamed into place; `latest` is replaced atomically only afterwards, so a crash or a
full disk mid-save never leaves a half-written checkpoint as the one to resume from.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

MODEL, OPTIMIZER, STATE = "model.safetensors", "optimizer.pt", "state.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message says which and why."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def latest(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not (path / STATE).is_file():
        raise CheckpointError(f"{pointer} names {path.name}, which is incomplete or missing")
    return path


def save(
    run_dir: str | Path, step: int, model: nn.Module, extra: dict[str, object], state: dict[str, object], keep: int
) -> Path:
    """Write checkpoint `step` (weights, `extra` tensors via torch.save, `state` as JSON) and point `latest` at it."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    tmp = root / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp / MODEL))
        torch.save(extra, tmp / OPTIMIZER)
        (tmp / STATE).write_text(json.dumps(state, indent=1))
        for f in tmp.iterdir():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
        final = root / name
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        _fsync_dir(root)
        _write_text_atomic(root / "latest", name)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        why = "the disk is full" if err.errno == errno.ENOSPC else str(err)
        prev = latest(run_dir)
        kept = f"the previous checkpoint {prev} is intact" if prev else "no earlier checkpoint exists"
        raise CheckpointError(f"could not write the checkpoint of step {step}: {why}; {kept}") from None
    old = sorted(p for p in root.glob("step_*") if p.is_dir() and p.name != name)
    for p in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def load_weights(path: Path, model: nn.Module) -> None:
    """Load model.safetensors into `model`, explaining any mismatch with the run's config."""
    try:
        weights = load_file(str(path / MODEL))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path / MODEL} is corrupt or unreadable ({err}); use an earlier checkpoint") from None
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
    shapes = [
        f"{k}: {tuple(weights[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in weights and weights[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"{path} does not fit this model configuration: missing {missing[:4]}, unexpected {unexpected[:4]}, "
            f"shape mismatches {shapes[:4]}; was it trained with another preset or variant?"
        )
    model.load_state_dict(weights)


def load(path: Path) -> tuple[dict[str, object], dict[str, object]]:
    """(extra tensors, JSON state) of a checkpoint; nothing is unpickled beyond tensors and containers."""
    try:
        state = json.loads((path / STATE).read_text())
        extra = torch.load(path / OPTIMIZER, map_location="cpu", weights_only=True)
    except (OSError, json.JSONDecodeError, RuntimeError, EOFError) as err:
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable ({err}); use an earlier one") from None
    return extra, state
