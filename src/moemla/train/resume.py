"""Starting or resuming a run: what training checks against a run folder's run.json before it writes to it.

The folder itself (files, lock, metrics, checkpoints) is moemla.runs.RunFolder's.
"""

from __future__ import annotations

from pathlib import Path

from moemla.config import ModelConfig
from moemla.data.shards import PreparedData
from moemla.data.sources import DataError
from moemla.folders import MANIFEST, TOKENIZER_FILE
from moemla.runs.folder import RUN_FILE, RunError, RunFolder
from moemla.train.config import TrainConfig


def configs(meta: dict) -> tuple[ModelConfig, TrainConfig]:
    return ModelConfig.from_dict(meta["model"]), TrainConfig.from_dict(meta["train"])


def data_meta(data: PreparedData) -> dict[str, object]:
    # the path absolute: run.json's data folder resolves the same from any working directory
    return {"path": str(Path(data.root).resolve()), "sha256": data.sha256, "tokenizer_sha256": data.tokenizer_sha256,
            "vocab_size": data.vocab_size, "train_tokens": data.tokens("train")}  # fmt: skip


def recorded_data(run_dir: Path) -> Path | None:
    """For --resume without --data: the prepared folder the run was trained on, if it records one."""
    run = RunFolder(run_dir)
    if not run.exists():
        return None
    path = run.data_path
    if not path or not (path / MANIFEST).is_file():
        raise RunError(
            f"{run_dir} was trained on {path or 'no recorded data'}, which is not a prepared data folder now; "
            "pass --data FOLDER (with --new-data if it holds other data than the run was trained on)"
        )
    return path


def check_same_data(run_dir: Path, old: dict, data: PreparedData, new_data: bool) -> None:
    """The resume check of the data (RunFolder.data_difference is the rule): the run goes on with the data it was
    trained on, unless asked."""
    differs = RunFolder(run_dir).data_difference(data.tokenizer_sha256, data.sha256, data.root)
    if differs == "tokenizer":
        raise DataError(
            f"{data.root} was tokenized with a different tokenizer than the run {run_dir} was trained on "
            f"({old['path']}); resume with data prepared by the same tokenizer"
        )
    if differs == "data" and not new_data:
        was = f"{old['train_tokens']:,} training tokens" if "train_tokens" in old else "other data"
        raise RunError(
            f"--resume continues {run_dir} on the data it was trained on ({old['path']}, {was}); {data.root} holds "
            f"other data ({data.tokens('train'):,} training tokens); drop --data to continue as trained, or pass "
            "--new-data to go on with this data"
        )


def start(run_dir: Path, cfg: ModelConfig, tc: TrainConfig, data: PreparedData, resume: bool, new_data: bool) -> dict:
    """Check a resume against run.json (model and data); a new run's run.json and tokenizer are written now.
    Returns the run.json a resumed run writes (RunFolder.write_meta) once its checkpoint has loaded."""
    meta = {"model": cfg.to_dict(), "train": tc.to_dict(), "data": data_meta(data)}
    run = RunFolder(run_dir)
    if run.exists():
        old = run.meta
        if not resume:
            raise RunError(f"{run_dir} already holds a run; pass --resume to continue it, or choose another --out")
        check_same_data(run_dir, old["data"], data, new_data)
        check_same_model(run_dir, cfg)
        return meta
    run.write_meta(meta)
    run.write_tokenizer(data.root / TOKENIZER_FILE)
    return meta


def check_same_model(run_dir: Path, asked: ModelConfig) -> None:
    """The resume check of the model (RunFolder.model_differences is the rule): a run continues as configured."""
    changed = RunFolder(run_dir).model_differences(asked)
    if changed:
        raise RunError(
            f"--resume continues {run_dir} as configured in its {RUN_FILE}; model settings cannot change "
            f"(asked to change: {', '.join(changed)})"
        )
