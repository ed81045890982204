import errno
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moemla.config import ConfigError, ModelConfig
from moemla.data.shards import write_prepared
from moemla.data.sources import DataError, builtin_source
from moemla.eval.perplexity import evaluate
from moemla.model import Transformer
from moemla.runs import RunFolder, checkpoint
from moemla.runs.checkpoint import CheckpointError
from moemla.train.config import TrainConfig, lr_at, param_groups
from moemla.train.loop import TrainingDiverged, train
from tests.conftest import ALL_VARIANTS

from .conftest import load_run

TC = TrainConfig(
    max_steps=6, batch_size=8, micro_batch_size=4, seq_len=32, lr=3e-3, eval_interval=3, ckpt_interval=3,
    eval_tokens=1024, log_interval=1, device="cpu",
)  # fmt: skip
# NOTE: bitwise resume and process-count invariance are CPU invariants: CUDA kernels such as index_add's
# atomics sum in a varying order, so on a GPU these tests pin the CPU (test_resume_on_cuda_within_tolerance)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "builtin"
    write_prepared(builtin_source(400), out, {"dataset": "builtin", "stories": 400}, vocab_size=300)
    return out


def cfg(variant: str = "moe-mla-rope", **kw: object) -> ModelConfig:
    return ModelConfig.from_preset("debug", variant, vocab_size=300, **kw)


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint.latest(run) / checkpoint.MODEL))


def test_lr_schedule_warms_up_then_decays_to_min() -> None:
    tc = TrainConfig(max_steps=100, lr=1e-3, min_lr=1e-5, warmup_frac=0.1)
    lrs = [lr_at(s, tc) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:]))
    assert lr_at(100, tc) == pytest.approx(1e-5)


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_weight_decay_groups_cover_every_parameter_once(variant: str) -> None:
    model = Transformer(cfg(variant))
    decay, no_decay = (g["params"] for g in param_groups(model, 0.1))
    assert len(decay) + len(no_decay) == len(list(model.parameters()))
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim >= 2 and not names[id(p)].startswith(("wte", "wpe")) for p in decay)
    assert any(names[id(p)] == "wte.weight" for p in no_decay)


def test_train_checkpoint_resume_eval(data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    first = train(data, run, cfg(), TC.replace(max_steps=3), log=lambda _: None)
    assert first["step"] == 3 and checkpoint.latest(run).name == "step_00000003"
    last = train(data, run, cfg(), TC, resume=True, log=lambda _: None)
    rows = RunFolder(run).metrics()
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert last["val_loss"] < math.log(300)  # better than uniform over the vocabulary
    model, tok, _ = load_run(run)
    assert tok.get_vocab_size() == 300
    from moemla.data.shards import PreparedData

    ev = evaluate(model, PreparedData.open(data).shards("val"), seq_len=32, batch_size=4, max_tokens=1024)
    assert ev["val_loss"] == pytest.approx(last["val_loss"], rel=1e-5)
    assert len(ev["expert_load_cv"]) == 2 and ev["val_ppl_ci95"][0] < ev["val_ppl"] < ev["val_ppl_ci95"][1]


def test_resume_matches_uninterrupted_run(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    train(data, tmp_path / "a", cfg(), TC, log=lambda _: None)
    real = RunFolder.save_checkpoint

    def save_then_die(*args: object, **kw: object) -> Path:
        real(*args, **kw)
        raise KeyboardInterrupt  # interrupted right after the step-3 checkpoint

    monkeypatch.setattr(RunFolder, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(data, tmp_path / "b", cfg(), TC, log=lambda _: None)
    monkeypatch.undo()
    train(data, tmp_path / "b", cfg(), TC, resume=True, log=lambda _: None)
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # bitwise, routing biases included


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_resume_on_cuda_within_tolerance(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tc = TC.replace(device="cuda")
    train(data, tmp_path / "a", cfg(), tc, log=lambda _: None)
    real = RunFolder.save_checkpoint

    def save_then_die(*args: object, **kw: object) -> Path:
        real(*args, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(RunFolder, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(data, tmp_path / "b", cfg(), tc, log=lambda _: None)
    monkeypatch.undo()
    train(data, tmp_path / "b", cfg(), tc, resume=True, log=lambda _: None)
    loss = [[r["loss"] for r in RunFolder(tmp_path / run).metrics() if r["split"] == "train"] for run in ("a", "b")]
    assert loss[0] == pytest.approx(loss[1], rel=1e-3)  # stated tolerance: float summation order only
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-3) for k in wa if not k.endswith("router.bias"))


def test_more_processes_than_gpus_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from moemla.train import distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ValueError, match=r"has 1; launch at most 1 processes.*--device cpu"):
        distributed.setup("cuda")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "moemla", *args]


def test_sigkill_mid_training_then_resume_is_bitwise_equal(data: Path, tmp_path: Path) -> None:
    flags = [
        "--data", str(data), "--preset", "debug", "--max-steps", "160", "--batch-size", "8", "--micro-batch-size",
        "4", "--seq-len", "32", "--ckpt-interval", "20", "--eval-interval", "1000", "--eval-tokens", "512",
        "--device", "cpu",
    ]  # fmt: skip
    victim = subprocess.Popen(_cli("train", "--out", str(tmp_path / "killed"), *flags), stdout=subprocess.DEVNULL)
    pointer = tmp_path / "killed" / "checkpoints" / "latest"
    deadline = time.time() + 120
    while not (pointer.exists() and pointer.read_text().strip() >= "step_00000040") and time.time() < deadline:
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = checkpoint.latest(tmp_path / "killed").name
    subprocess.run(
        _cli("train", "--out", str(tmp_path / "killed"), "--resume", *flags), check=True, capture_output=True
    )
    subprocess.run(_cli("train", "--out", str(tmp_path / "whole"), *flags), check=True, capture_output=True)
    wa, wb = weights(tmp_path / "killed"), weights(tmp_path / "whole")
    assert killed_at != "step_00000160", "the run finished before it could be killed"
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_two_processes_match_one(data: Path, tmp_path: Path) -> None:
    flags = [
        "--data", str(data), "--preset", "debug", "--max-steps", "4", "--batch-size", "8", "--micro-batch-size",
        "4", "--seq-len", "32", "--dropout", "0", "--eval-interval", "1000", "--log-interval", "1",
        "--device", "cpu",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run(_cli("train", "--out", str(tmp_path / "one"), *flags), env=env, capture_output=True)
    assert one.returncode == 0, one.stderr.decode()
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
         "-m", "moemla", "train", "--out", str(tmp_path / "two"), *flags],
        env=env, capture_output=True,
    )  # fmt: skip
    assert ddp.returncode == 0, ddp.stderr.decode()[-3000:]
    loss = [[r["loss"] for r in RunFolder(tmp_path / run).metrics() if r["split"] == "train"] for run in ("one", "two")]
    assert loss[0] == pytest.approx(loss[1], rel=1e-4)
    w1, w2 = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert all(torch.allclose(w1[k], w2[k], atol=1e-4) for k in w1)
    bias = [k for k in w1 if k.endswith("router.bias")]
    assert bias and all(torch.equal(w1[k], w2[k]) for k in bias)  # loads were all-reduced before the update


def test_vocabulary_and_context_mismatches_are_refused(data: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="vocab_size is 256"):
        train(data, tmp_path / "r", ModelConfig.from_preset("debug"), TC)
    with pytest.raises(ConfigError, match="exceeds the model's context"):
        train(data, tmp_path / "r", cfg(), TC.replace(seq_len=128))


def test_nan_loss_stops_with_step_and_keeps_checkpoint(data: Path, tmp_path: Path) -> None:
    with pytest.raises(TrainingDiverged, match=r"at step \d+.*last good checkpoint is .*step_"):
        train(
            data, tmp_path / "r", cfg(), TC.replace(max_steps=50, lr=1e30, min_lr=1e30, warmup_frac=0, ckpt_interval=1)
        )
    assert checkpoint.latest(tmp_path / "r") is not None


def test_full_disk_never_leaves_a_half_checkpoint(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "r"
    train(data, run, cfg(), TC.replace(max_steps=3), log=lambda _: None)
    real = checkpoint.torch.save

    def full(*args: object, **kw: object) -> None:
        real(*args, **kw)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    with pytest.raises(CheckpointError, match=r"disk is full.*step_00000003 is intact"):
        train(data, run, cfg(), TC, resume=True, log=lambda _: None)
    assert checkpoint.latest(run).name == "step_00000003"
    assert not list((run / "checkpoints").glob(".tmp-*"))


def test_corrupt_or_incompatible_checkpoint(data: Path, tmp_path: Path) -> None:
    run = tmp_path / "r"
    train(data, run, cfg(), TC.replace(max_steps=3), log=lambda _: None)
    with pytest.raises(CheckpointError, match="does not fit this model configuration"):
        checkpoint.load_weights(checkpoint.latest(run), Transformer(cfg(dim=64)))
    (checkpoint.latest(run) / checkpoint.MODEL).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_run(run)


def test_resume_refuses_other_tokenizer(data: Path, tmp_path: Path) -> None:
    run = tmp_path / "r"
    train(data, run, cfg(), TC.replace(max_steps=3), log=lambda _: None)
    other = tmp_path / "other"
    write_prepared(builtin_source(400), other, {"dataset": "builtin", "stories": 400}, vocab_size=290)
    with pytest.raises(DataError, match="different tokenizer"):
        train(other, run, cfg(), TC, resume=True)
    meta = json.loads((run / "run.json").read_text())
    assert meta["data"]["vocab_size"] == 300


@pytest.mark.slow
def test_compile_failure_falls_back_to_eager_with_one_message(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_compile(module: torch.nn.Module) -> object:
        def run(*args: object) -> object:
            raise RuntimeError("InductorError: no working C++ compiler found\nlong details")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    log: list[str] = []
    result = train(data, tmp_path / "r", cfg(), TC.replace(max_steps=2, compile=True), log=log.append)
    assert result["step"] == 2 and math.isfinite(result["val_loss"])
    messages = [line for line in log if "torch.compile is unavailable" in line]
    assert len(messages) == 1 and "no working C++ compiler" in messages[0] and "--compile false" in messages[0]
    assert TrainConfig().compile is None  # auto: compiled on CUDA, eager on the CPU


@pytest.mark.slow  # inductor's C++ compile of a training step: ~50 s on 2 cold cores
def test_compiled_training_runs(data: Path, tmp_path: Path) -> None:
    result = train(data, tmp_path / "r", cfg(), TC.replace(max_steps=2, compile=True), log=lambda _: None)
    assert result["step"] == 2 and math.isfinite(result["val_loss"])


class _ScalarReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts reads of one tensor element into Python (item, float, bool, `if tensor`): each a host sync on a GPU.
    AdamW's own reads are left out: it keeps its step counters on the host (and fused AdamW on CUDA reads none)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += not any("torch/optim/" in f.filename for f in traceback.extract_stack())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("variant", ["moe-mla-rope", "mha"])
def test_a_training_step_reads_the_device_once(data: Path, tmp_path: Path, monkeypatch, variant: str) -> None:
    """No scalar read inside a step (the divergence checks and per-layer load CVs used to be one host sync
    each): loss, gradient norm and CVs come back in one transfer after every kernel of the step is queued."""
    from moemla.train import loop

    steps, real = [], loop._train_step

    def counted(s, shards):
        with _ScalarReads() as mode:
            out = real(s, shards)
        steps.append(mode.reads)
        return out

    monkeypatch.setattr(loop, "_train_step", counted)
    train(data, tmp_path / "run", cfg(variant), TC.replace(max_steps=2, eval_interval=2), log=lambda _: None)
    assert steps == [0, 0]
    cvs = [r["load_cv"] for r in RunFolder(tmp_path / "run").metrics() if r["split"] == "train"]
    assert cvs == [None, None] if variant == "mha" else all(len(c) == 2 and max(c) > 0 for c in cvs)


def test_resume_and_a_sweep_share_one_same_run_rule(trained_debug_run: Path, tmp_path: Path) -> None:
    """--resume and a sweep's output folder (and --reuse) decide "the same data?" by one rule (RunFolder's): the
    same tokenizer, then the data checksum, or for runs recorded before checksums the data folder while it exists."""
    import dataclasses
    import shutil

    from moemla.config import ConfigError
    from moemla.data.shards import PreparedData
    from moemla.data.sources import DataError
    from moemla.experiments.sweep import _check_same_run
    from moemla.runs import RunFolder
    from moemla.train.config import TrainConfig
    from moemla.train.resume import check_same_data

    @dataclasses.dataclass
    class Data:  # what both checks read of a PreparedData
        root: Path
        tokenizer_sha256: str
        sha256: str

        def tokens(self, split: str) -> int:
            return 1000

    run_dir = tmp_path / "run"
    shutil.copytree(trained_debug_run, run_dir)
    run = RunFolder.open(run_dir)
    real = PreparedData.open(run.meta["data"]["path"])
    cfg, tc = run.model_config, TrainConfig.from_dict(run.train_settings)

    def verdicts(data: Data) -> tuple[bool, bool]:
        try:
            check_same_data(run_dir, run.meta["data"], data, new_data=False)
            resume_same = True
        except (DataError, ValueError):
            resume_same = False
        try:
            _check_same_run(run_dir, cfg, tc, data)
            sweep_same = True
        except ConfigError:
            sweep_same = False
        return resume_same, sweep_same

    same = Data(real.root, real.tokenizer_sha256, real.sha256)
    cases = {
        "same": (same, True),
        "other text": (dataclasses.replace(same, sha256="0" * 64), False),
        "other tokenizer": (dataclasses.replace(same, tokenizer_sha256="1" * 64), False),
    }
    for name, (data, want) in cases.items():
        assert verdicts(data) == (want, want), name
    # a run recorded before data checksums: its data folder is its identity while that folder holds data
    meta = run.meta
    del meta["data"]["sha256"]
    run.write_meta(meta)
    elsewhere = dataclasses.replace(same, root=tmp_path, sha256="2" * 64)
    assert verdicts(dataclasses.replace(same, sha256="2" * 64)) == (True, True)
    assert verdicts(elsewhere) == (False, False)
    meta["data"]["path"] = str(tmp_path / "gone")
    run.write_meta(meta)
    assert verdicts(elsewhere) == (True, True)  # the folder is gone: the tokenizer is all there is to compare
