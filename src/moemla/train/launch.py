"""Settings for a training run, resolved once: defaults < preset < config file < flags; then train."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

from moemla.config import BLOCK_FIELDS, DEFAULT_FLAVOR, DEFAULT_PRESET, DEFAULT_VARIANT, ConfigError, ModelConfig
from moemla.data.shards import PreparedData
from moemla.folders import check_destination
from moemla.runs.folder import RunFolder
from moemla.train.config import TrainConfig
from moemla.train.loop import train
from moemla.train.resume import check_same_model, configs, recorded_data

CONFIG_KEYS = {"preset", "variant", "flavor", "model", "train"}


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
    *,
    resume: bool = False,
    preset: str | None = None,
    variant: str | None = None,
    flavor: str | None = None,
    file: dict | None = None,
    model_flags: dict | None = None,
    train_flags: dict | None = None,
) -> tuple[ModelConfig, TrainConfig]:
    """Defaults < preset < config file < flags; the model's vocabulary and context follow the data by default."""
    file = file or {}
    model_over = {**file.get("model", {}), **(model_flags or {})}
    train_over = {**file.get("train", {}), **(train_flags or {})}
    preset = preset or file.get("preset")
    variant = variant or file.get("variant")
    flavor = flavor or file.get("flavor")
    if resume and RunFolder(run_dir).exists():
        cfg, tc = configs(RunFolder(run_dir).meta)
        if preset or variant or flavor:  # a named preset, variant or flavor must be the one the run started with
            # an unnamed flavor is the run's own block (its switches as recorded)
            block = {} if flavor else {f: getattr(cfg, f) for f in BLOCK_FIELDS}
            asked = ModelConfig.from_preset(
                preset or DEFAULT_PRESET, variant or DEFAULT_VARIANT, flavor or DEFAULT_FLAVOR,
                **{"vocab_size": cfg.vocab_size, **block, **model_over},
            )  # fmt: skip
        else:  # flags alone change fields of the run's own config
            asked = cfg.replace(**model_over)
        check_same_model(run_dir, asked)
        return cfg, tc.replace(**train_over)
    model_over.setdefault("vocab_size", data.vocab_size)
    cfg = ModelConfig.from_preset(preset or DEFAULT_PRESET, variant or DEFAULT_VARIANT, flavor or DEFAULT_FLAVOR,
                                  **model_over)  # fmt: skip
    train_over.setdefault("seq_len", min(TrainConfig.seq_len, cfg.max_seq_len))
    return cfg, TrainConfig.from_dict(train_over)


DEFAULT_DATA = "data/builtin"


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; `note` says what a resume continues from (the CLI prints it)."""

    def __init__(self, note: str) -> None:
        super().__init__(note)
        self.note = note


def run_training(
    data_dir: str | Path | None,
    *,
    out: str | Path | None = None,
    resume: bool = False,
    preset: str | None = None,
    variant: str | None = None,
    flavor: str | None = None,
    config_file: str | None = None,
    model_flags: dict | None = None,
    train_flags: dict | None = None,
    checkpoint_name: str | None = None,
    new_data: bool = False,
) -> dict:
    """`moemla train`: resolve the settings, then train (or resume) the run in `out`; returns the final metrics.
    Without `data_dir` a new run trains on data/builtin and a resumed one on the data it was trained on."""
    file = read_config_file(config_file)
    name = f"{preset or file.get('preset', DEFAULT_PRESET)}-{variant or file.get('variant', DEFAULT_VARIANT)}"
    flavor_ = flavor or file.get("flavor", DEFAULT_FLAVOR)
    name += "" if flavor_ == DEFAULT_FLAVOR else f"-{flavor_}"
    run_dir = Path(out or f"runs/{name}")
    if data_dir is None:
        data_dir = (recorded_data(run_dir) if resume else None) or DEFAULT_DATA
    # a new, empty or run folder only: never into prepared data, an export or a folder of other files
    check_destination(run_dir, "train", sources=(data_dir,), fix="choose another --out")
    data = PreparedData.open(data_dir)
    cfg, tc = resolve_configs(
        data, run_dir, resume=resume, preset=preset, variant=variant, flavor=flavor, file=file, model_flags=model_flags,
        train_flags=train_flags,
    )  # fmt: skip
    try:
        return train(data_dir, run_dir, cfg, tc, resume=resume, from_checkpoint=checkpoint_name, new_data=new_data)
    except KeyboardInterrupt:
        ckpt = RunFolder(run_dir).latest_checkpoint()
        raise TrainingInterrupted(
            f"; the run continues from its last checkpoint ({ckpt.name}) with the same command and --resume"
            if ckpt is not None
            else "; no checkpoint yet: --resume starts over"
        ) from None
