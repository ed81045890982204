"""What `moemla prepare | train | eval` do once their flags are parsed: resolve settings, call the library."""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path

import numpy as np

from moemla.config import DEFAULT_PRESET, DEFAULT_VARIANT, ConfigError, ModelConfig
from moemla.data.shards import PreparedData, prepare
from moemla.data.sources import DataError, builtin_source, file_source, tinystories_source
from moemla.data.tokenizer import eot_id, token_bytes
from moemla.eval.perplexity import amp_dtype, evaluate
from moemla.train.config import TrainConfig
from moemla.train.distributed import resolve_device
from moemla.train.loop import train
from moemla.train.run_folder import RUN_FILE, configs, load_model, read_meta

CONFIG_KEYS = {"preset", "variant", "model", "train"}


def prepare_data(
    dataset: str,
    text: list[str] | None,
    out: str | None,
    tokenizer: str,
    vocab_size: int,
    stories: int,
    corpus_seed: int,
    val_fraction: float,
    overwrite: bool,
) -> tuple[Path, dict]:
    """Resolve the source, then tokenize it into a prepared folder (reused when already there)."""
    if text:
        source = file_source(text)
        description: dict[str, object] = {
            "dataset": "text",
            "files": [file_identity(p) for p in text],
        }
        name = "text"
    elif dataset == "builtin":
        source = builtin_source(stories, corpus_seed)
        description = {"dataset": "builtin", "stories": stories, "seed": corpus_seed}
        name = "builtin"
    elif dataset == "tinystories":
        source = tinystories_source(limit=stories)
        description = {"dataset": "tinystories", "limit": stories}
        name = "tinystories"
    else:
        raise DataError(f"unknown dataset {dataset!r}: use builtin or tinystories, or local files with --text")
    folder = Path(out or f"data/{name}")
    manifest = prepare(source, folder, description, tokenizer, vocab_size, val_fraction, overwrite=overwrite)
    return folder, manifest


def file_identity(path: str | Path) -> dict[str, object]:
    """Path, size and content hash of an input file: a prepared folder is reused only for the same content."""
    p = Path(path)
    digest = hashlib.sha256()
    with p.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"path": str(p.resolve()), "bytes": p.stat().st_size, "sha256": digest.hexdigest()}


def read_config_file(path: str | None) -> dict:
    """A JSON or TOML run file: {preset, variant, model: {...}, train: {...}}, all optional."""
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = tomllib.loads(p.read_text()) if p.suffix == ".toml" else json.loads(p.read_text())
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"{p} is not valid {'TOML' if p.suffix == '.toml' else 'JSON'}: {err}") from None
    unknown = set(data) - CONFIG_KEYS
    if unknown:
        raise ConfigError(f"{p}: unknown key(s) {sorted(unknown)}; allowed: {sorted(CONFIG_KEYS)}")
    return data


def resolve_configs(
    data: PreparedData,
    run_dir: Path,
    resume: bool,
    preset: str | None,
    variant: str | None,
    file: dict,
    model_flags: dict,
    train_flags: dict,
) -> tuple[ModelConfig, TrainConfig]:
    """Defaults < preset < config file < flags; the model's vocabulary and context follow the data by default."""
    model_over = {**file.get("model", {}), **model_flags}
    train_over = {**file.get("train", {}), **train_flags}
    if resume and (run_dir / RUN_FILE).exists():
        cfg, tc = configs(read_meta(run_dir))
        asked = ModelConfig.from_preset(
            preset or file.get("preset", DEFAULT_PRESET), variant or file.get("variant", DEFAULT_VARIANT),
            **{"vocab_size": cfg.vocab_size, **model_over},
        )  # fmt: skip
        if (preset or variant or model_over) and asked != cfg:
            raise ConfigError(
                f"--resume continues {run_dir} as configured in its run.json; model settings cannot change"
            )
        return cfg, tc.replace(**train_over)
    model_over.setdefault("vocab_size", data.vocab_size)
    cfg = ModelConfig.from_preset(
        preset or file.get("preset", DEFAULT_PRESET), variant or file.get("variant", DEFAULT_VARIANT), **model_over
    )
    train_over.setdefault("seq_len", min(TrainConfig.seq_len, cfg.max_seq_len))
    return cfg, TrainConfig.from_dict(train_over)


def run_training(
    data_dir: str, out: str | None, resume: bool, preset: str | None, variant: str | None, config_file: str | None,
    model_flags: dict, train_flags: dict, checkpoint_name: str | None = None,
) -> dict:  # fmt: skip
    file = read_config_file(config_file)
    data = PreparedData.open(data_dir)
    name = f"{preset or file.get('preset', DEFAULT_PRESET)}-{variant or file.get('variant', DEFAULT_VARIANT)}"
    run_dir = Path(out or f"runs/{name}")
    cfg, tc = resolve_configs(data, run_dir, resume, preset, variant, file, model_flags, train_flags)
    return train(data_dir, run_dir, cfg, tc, resume=resume, from_checkpoint=checkpoint_name)


def text_tokens(paths: list[str], tok) -> list[np.ndarray]:
    """Raw text files tokenized with a run's tokenizer, stories separated by <|endoftext|>, as one shard."""
    eot = eot_id(tok)
    ids: list[int] = []
    for enc in tok.encode_batch(list(file_source(paths)())):
        ids += [*enc.ids, eot]
    return [np.array(ids, dtype=np.int64)]


def evaluate_run(
    run_dir: str, data_dir: str | None, text: list[str] | None, split: str, max_tokens: int | None,
    batch_size: int | None, device: str, checkpoint_name: str | None = None,
) -> dict:  # fmt: skip
    dev = resolve_device(device)
    model, tok, meta = load_model(run_dir, dev, checkpoint_name)
    _, tc = configs(meta)
    if text:
        shards = text_tokens(text, tok)
    else:
        data = PreparedData.open(data_dir or meta["data"]["path"])
        if data.tokenizer_sha256 != meta["data"]["tokenizer_sha256"]:
            raise DataError(
                f"{data.root} was tokenized with a different tokenizer than {run_dir} was trained with; "
                "evaluate on data prepared with the run's tokenizer, or pass raw text with --text"
            )
        shards = data.shards(split)
    batch = tc.micro_batch_size if batch_size is None else batch_size
    result = evaluate(model, shards, tc.seq_len, batch, max_tokens, dev, amp_dtype(dev, tc.amp), token_bytes(tok))
    return {"run": str(run_dir), **result}
