"""A run folder: run.json (model config, training settings, data), tokenizer.json, metrics.jsonl, checkpoints/
and a lock, as one object. Training creates it and writes through it; every other wing opens it read-only and
reads only its ModelConfig (the training settings stay a plain dict here: this layer knows no TrainConfig).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch
from tokenizers import Tokenizer

from moemla.config import ModelConfig
from moemla.data.tokenizer import load_tokenizer
from moemla.folders import (
    MANIFEST,
    METRICS_FILE,
    RUN_FILE,
    RUN_KEYS,
    TOKENIZER_FILE,
    RecordError,
    read_record,
    write_text_atomic,
)
from moemla.model import Transformer
from moemla.runs.checkpoint import STATE, find, latest, load_weights, save

LOCK_FILE = ".lock"


class RunError(ValueError):
    """A run folder that cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class RunFolder:
    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))  # a str is welcome too

    @classmethod
    def open(cls, path: str | Path) -> RunFolder:
        """An existing run (it has a run.json); RunError naming the fix otherwise."""
        run = cls(Path(path))
        if not run.exists():
            raise run._not_a_run()
        return run

    def _not_a_run(self) -> RunError:
        return RunError(f"{self.path} is not a moemla run folder (no {RUN_FILE}); train one with `moemla train`")

    def exists(self) -> bool:
        return (self.path / RUN_FILE).is_file()

    # reading ---------------------------------------------------------------------------------------------------
    @property
    def meta(self) -> dict:
        """run.json as it is on disk."""
        path = self.path / RUN_FILE
        if not path.is_file():
            raise self._not_a_run()
        try:
            return read_record(path, RUN_KEYS, "restore it from a copy, or train the run again")
        except RecordError as err:
            raise RunError(str(err)) from None

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.meta["model"])

    @property
    def train_settings(self) -> dict:
        """The training settings as recorded (TrainConfig's fields); train/ turns them back into a TrainConfig."""
        return self.meta["train"]

    @property
    def data_path(self) -> Path | None:
        """The prepared data folder the run was trained on, the same from any working directory. run.json records
        it absolute; runs recorded before that hold it relative to where training ran, so a relative path is looked
        for from here, then from each folder above the run (the first that holds prepared data wins)."""
        recorded = self.meta.get("data", {}).get("path")
        if not recorded:
            return None
        path = Path(recorded)
        if path.is_absolute():
            return path
        tries = [path, *(base / path for base in self.path.resolve().parents)]
        return next((p.resolve() for p in tries if (p / MANIFEST).is_file()), path)

    def tokenizer(self) -> Tokenizer:
        return load_tokenizer(str(self.path / TOKENIZER_FILE))

    def checkpoint(self, name: str | None = None) -> Path | None:
        """Checkpoint `name` (step_N), or the newest; None when the run has none yet."""
        return find(self.path, name)

    def load_model(
        self, device: str | torch.device = "cpu", checkpoint: str | None = None, finite: bool = False
    ) -> Transformer:
        """A checkpoint's model in eval mode: the newest, or `checkpoint` (step_N). With `finite` (exports), a
        checkpoint whose weights hold NaN or infinite values is a RunError that names it."""
        cfg = self.model_config
        path = self.checkpoint(checkpoint)
        if path is None:
            raise RunError(f"{self.path} has no checkpoint yet; train it (or let training reach its first checkpoint)")
        model = Transformer(cfg)
        load_weights(path, model)
        weights = model.state_dict().values() if finite else ()
        bad = sum(int((~torch.isfinite(p)).sum()) for p in weights if p.is_floating_point())
        if bad:
            raise RunError(f"{path} holds {bad:,} NaN or infinite weights (training diverged before it was saved); "
                           "use an earlier checkpoint with --checkpoint step_N")  # fmt: skip
        return model.to(device).eval()

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint (None: none yet)."""
        return latest(self.path)

    def metrics(self) -> list[dict]:
        path = self.path / METRICS_FILE
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def finished(self, steps: int) -> bool:
        """The newest checkpoint has reached `steps` (False for a folder with none, or no folder)."""
        ckpt = latest(self.path)
        return ckpt is not None and json.loads((ckpt / STATE).read_text())["step"] >= steps

    # the one "same run?" rule (resume, a sweep's output folder, --reuse) ------------------------------------------
    def model_differences(self, cfg: ModelConfig) -> list[str]:
        """Model fields that differ from cfg, read through ModelConfig so that a field added since this run was made
        reads as its default, which by rule keeps the old behaviour (e.g. `routing` top-k before top-p existed)."""
        stored, asked = self.model_config.to_dict(), cfg.to_dict()
        return sorted(k for k, v in asked.items() if stored.get(k) != v)

    def data_difference(self, tokenizer_sha256: str, sha256: str, root: Path) -> str | None:
        """None when prepared data (its tokenizer's and contents' checksums, its folder) is what this run was trained
        on; "tokenizer" or "data" naming what differs. Runs recorded before data checksums, and imported runs, are
        identified by their data folder while it still holds prepared data, else by the tokenizer alone."""
        old = self.meta["data"]
        if old["tokenizer_sha256"] != tokenizer_sha256:
            return "tokenizer"
        if "sha256" in old:
            return None if old["sha256"] == sha256 else "data"
        path = self.data_path or Path()
        moved = not (path / MANIFEST).is_file()
        return None if moved or path.resolve() == Path(root).resolve() else "data"

    # writing (training's, and an import's) -----------------------------------------------------------------------
    def save_checkpoint(self, step: int, model: torch.nn.Module, extra: dict, state: dict, keep: int) -> Path:
        """checkpoints/step_N, written atomically (runs/checkpoint.py); the oldest beyond `keep` removed."""
        return save(self.path, step, model, extra, state, keep)

    def write_meta(self, meta: dict) -> None:
        """run.json, atomically; left as it is when nothing changed."""
        path = self.path / RUN_FILE
        if path.is_file() and self.meta == meta:
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, json.dumps(meta, indent=1))
        except OSError as err:
            why = "the disk is full" if err.errno == errno.ENOSPC else str(err)
            raise RunError(f"could not write {path}: {why}; the run folder is unchanged") from None

    def write_tokenizer(self, source: Path) -> None:
        """The data's tokenizer.json, copied once: a run keeps the tokenizer it started with."""
        if (self.path / TOKENIZER_FILE).is_file():
            return
        try:
            shutil.copyfile(source, self.path / TOKENIZER_FILE)
        except OSError as err:
            raise RunError(f"could not write {self.path / TOKENIZER_FILE}: {err.strerror}") from None

    def metrics_file(self) -> TextIO:
        """metrics.jsonl opened for appending (the caller closes it), one JSON record a line."""
        return (self.path / METRICS_FILE).open("a")

    def truncate_metrics(self, step: int) -> None:
        """On resume, forget records written after the checkpoint being resumed from (atomically: a full disk
        must not empty the file)."""
        path = self.path / METRICS_FILE
        if path.is_file():
            keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
            try:
                write_text_atomic(path, "".join(line + "\n" for line in keep))
            except OSError as err:
                raise RunError(f"could not rewrite {path}: {err.strerror}; the file is unchanged") from None

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold an exclusive lock on the folder; a second process on it gets a RunError at once.

        The lock is an flock on RUN/.lock, which the kernel drops when its process dies, so the lock of a
        killed run never blocks the resume. (Where flock is missing, on Windows, nothing is locked.)
        """
        try:
            import fcntl
        except ImportError:
            yield
            return
        self.path.mkdir(parents=True, exist_ok=True)
        with (self.path / LOCK_FILE).open("a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "another process"
                raise RunError(
                    f"{self.path} is in use by {holder}; wait for it to finish or stop it (two writers would "
                    "interleave its metrics and checkpoints)"
                ) from None
            f.seek(0)
            f.truncate()
            f.write(f"process {os.getpid()} on {socket.gethostname()}")
            f.flush()
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
