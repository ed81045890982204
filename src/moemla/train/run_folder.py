"""A run folder: run.json (model config, train config, data), tokenizer.json, metrics.jsonl, checkpoints/.

This module owns it: creating it (start), locking it (lock_run), reading it, and the resume checks.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import torch
from tokenizers import Tokenizer

from moemla.config import ModelConfig
from moemla.data.shards import PreparedData
from moemla.data.sources import DataError
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


def data_meta(data: PreparedData) -> dict[str, object]:
    return {"path": str(data.root), "sha256": data.sha256, "tokenizer_sha256": data.tokenizer_sha256,
            "vocab_size": data.vocab_size, "train_tokens": data.tokens("train")}  # fmt: skip


def recorded_data(run_dir: Path) -> Path | None:
    """For --resume without --data: the prepared folder the run was trained on, if it records one."""
    if not (run_dir / RUN_FILE).exists():
        return None
    path = read_meta(run_dir)["data"].get("path")
    if not path or not (Path(path) / "manifest.json").is_file():
        raise RunError(
            f"{run_dir} was trained on {path or 'no recorded data'}, which is not a prepared data folder now; "
            "pass --data FOLDER (with --new-data if it holds other data than the run was trained on)"
        )
    return Path(path)


def check_same_data(run_dir: Path, old: dict, data: PreparedData, new_data: bool) -> None:
    """The one resume check of the data: the run goes on with the data it was trained on, unless asked."""
    if old["tokenizer_sha256"] != data.tokenizer_sha256:
        raise DataError(
            f"{data.root} was tokenized with a different tokenizer than the run {run_dir} was trained on "
            f"({old['path']}); resume with data prepared by the same tokenizer"
        )
    if "sha256" in old:
        same = old["sha256"] == data.sha256
    else:  # runs from before data checksums were recorded, and imported runs: the folder is the identity
        same = not (Path(old["path"]) / "manifest.json").is_file() or Path(old["path"]).resolve() == data.root.resolve()
    if not same and not new_data:
        was = f"{old['train_tokens']:,} training tokens" if "train_tokens" in old else "other data"
        raise RunError(
            f"--resume continues {run_dir} on the data it was trained on ({old['path']}, {was}); {data.root} holds "
            f"other data ({data.tokens('train'):,} training tokens); drop --data to continue as trained, or pass "
            "--new-data to go on with this data"
        )


def start(run_dir: Path, cfg: ModelConfig, tc: TrainConfig, data: PreparedData, resume: bool, new_data: bool) -> dict:
    """Check a resume against run.json (model and data); a new run's run.json and tokenizer are written now.
    Returns the run.json a resumed run writes (write_meta) once its checkpoint has loaded."""
    meta = {"model": cfg.to_dict(), "train": tc.to_dict(), "data": data_meta(data)}
    if (run_dir / RUN_FILE).exists():
        old = read_meta(run_dir)
        if not resume:
            raise RunError(f"{run_dir} already holds a run; pass --resume to continue it, or choose another --out")
        check_same_data(run_dir, old["data"], data, new_data)
        check_same_model(run_dir, ModelConfig.from_dict(old["model"]), cfg)
        return meta
    write_meta(run_dir, meta)
    try:
        if not (run_dir / TOKENIZER_FILE).is_file():
            shutil.copyfile(data.root / "tokenizer.json", run_dir / TOKENIZER_FILE)
    except OSError as err:
        raise RunError(f"could not write {run_dir / TOKENIZER_FILE}: {err.strerror}") from None
    return meta


def write_meta(run_dir: Path, meta: dict) -> None:
    """run.json, atomically; left as it is when nothing changed."""
    path = run_dir / RUN_FILE
    if path.is_file() and read_meta(run_dir) == meta:
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.write_text_atomic(path, json.dumps(meta, indent=1))
    except OSError as err:
        why = "the disk is full" if err.errno == errno.ENOSPC else str(err)
        raise RunError(f"could not write {path}: {why}; the run folder is unchanged") from None


def check_same_model(run_dir: Path, stored: ModelConfig, asked: ModelConfig) -> None:
    """The one resume check of the model: a run continues as configured in its run.json."""
    if stored != asked:
        changed = sorted(k for k, v in asked.to_dict().items() if stored.to_dict().get(k) != v)
        raise RunError(
            f"--resume continues {run_dir} as configured in its {RUN_FILE}; model settings cannot change "
            f"(asked to change: {', '.join(changed)})"
        )


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, forget records written after the checkpoint being resumed from (atomically: a full disk
    must not empty the file)."""
    if path.is_file():
        keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        try:
            checkpoint.write_text_atomic(path, "".join(line + "\n" for line in keep))
        except OSError as err:
            raise RunError(f"could not rewrite {path}: {err.strerror}; the file is unchanged") from None
