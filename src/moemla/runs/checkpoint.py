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
import pickle
import shutil
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from moemla.folders import write_text_atomic

MODEL, OPTIMIZER, STATE = "model.safetensors", "optimizer.pt", "state.json"
EARLIER = "use an earlier checkpoint with --checkpoint step_N (the run's checkpoints/ folder lists them)"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message says which and why."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _disk_full(err: Exception, folder: Path) -> bool:
    """ENOSPC, or a wrapped write error (torch.save, safetensors) on a disk with (almost) no room left."""
    if isinstance(err, OSError):
        return err.errno == errno.ENOSPC
    try:
        return shutil.disk_usage(folder).free < 1 << 20
    except OSError:
        return False


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file, readable as any other file the user writes (it creates files 0600)."""
    save_file(tensors, str(path), metadata=metadata)
    mask = os.umask(0)
    os.umask(mask)
    path.chmod(0o666 & ~mask)


def find(run_dir: str | Path, name: str | None = None) -> Path | None:
    """Checkpoint `name` (step_N, or N) of a run, or its newest one when name is None."""
    if name is None:
        return latest(run_dir)
    root = Path(run_dir) / "checkpoints"
    wanted = f"step_{int(name.removeprefix('step_')):08d}" if name.removeprefix("step_").isdigit() else name
    path = root / wanted
    if not (path / STATE).is_file():
        have = sorted(p.name for p in root.glob("step_*") if (p / STATE).is_file())
        raise CheckpointError(f"{run_dir} has no checkpoint {name!r}; it has: {', '.join(have) or 'none'}")
    return path


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
        save_safetensors({k: v.detach().contiguous() for k, v in model.state_dict().items()}, tmp / MODEL)
        torch.save(extra, tmp / OPTIMIZER)
        (tmp / STATE).write_text(json.dumps(state, indent=1))
        for f in tmp.iterdir():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
        final = root / name
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        _fsync_dir(root)
        write_text_atomic(root / "latest", name)
    except (OSError, RuntimeError, SafetensorError) as err:  # torch.save and safetensors wrap write errors
        shutil.rmtree(tmp, ignore_errors=True)
        why = "the disk is full" if _disk_full(err, root) else str(err).splitlines()[0]
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
        raise CheckpointError(f"{path / MODEL} is corrupt or unreadable ({err}); {EARLIER}") from None
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
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path / STATE} is corrupt or unreadable ({err}); {EARLIER}") from None
    try:
        with warnings.catch_warnings():  # torch warns about a foreign pickle protocol before we can say why
            warnings.simplefilter("ignore")
            extra = torch.load(path / OPTIMIZER, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, ValueError):
        # NOTE: weights_only refuses any object but tensors and containers; never retry without it
        raise CheckpointError(
            f"{path / OPTIMIZER} is not a moemla checkpoint (corrupt, or it holds objects other than tensors, "
            f"which moemla never unpickles); {EARLIER}"
        ) from None
    return extra, state
