"""The training loop: config, setup, data, model, optimizer, then steps with evaluation and checkpoints."""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from moemla import accounting
from moemla.compiling import CompiledOrEager
from moemla.config import ConfigError, ModelConfig
from moemla.data.shards import PreparedData, train_batch
from moemla.data.sources import DataError
from moemla.data.tokenizer import token_bytes
from moemla.device import amp_dtype, autocast, describe
from moemla.eval.perplexity import evaluate
from moemla.model import Transformer
from moemla.progress import Progress, duration
from moemla.runs import checkpoint
from moemla.runs.folder import RunError, RunFolder
from moemla.train import distributed
from moemla.train import resume as resume_checks
from moemla.train.config import TrainConfig, build_optimizer, lr_at


class TrainingDiverged(RuntimeError):
    """The loss or gradient became NaN/inf; the message names the step and the checkpoint that survives."""


def check_compatible(cfg: ModelConfig, tc: TrainConfig, data: PreparedData) -> None:
    if data.vocab_size > cfg.vocab_size:
        raise DataError(
            f"the data's tokenizer has {data.vocab_size:,} tokens but the model's vocab_size is {cfg.vocab_size:,}; "
            f"drop --vocab-size (it then follows the data) or set it to at least {data.vocab_size}"
        )
    if tc.seq_len > cfg.max_seq_len:
        raise ConfigError(
            f"seq_len={tc.seq_len} exceeds the model's context max_seq_len={cfg.max_seq_len}; lower --seq-len"
        )


def _tensorboard(run_dir: Path) -> object | None:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


def train(
    data_dir: str | Path,
    run_dir: str | Path,
    cfg: ModelConfig,
    tc: TrainConfig,
    resume: bool = False,
    log: Callable[[str], None] = print,
    from_checkpoint: str | None = None,
    new_data: bool = False,
) -> dict[str, object]:
    """Train `cfg` on a prepared folder into `run_dir`; returns the final metrics.

    resume continues from the newest checkpoint, or from `from_checkpoint` (step_N). The run folder is
    locked for the run's life: a second process on it is refused (RunError).
    """
    if from_checkpoint is not None and not resume:
        raise RunError("a checkpoint to start from (--checkpoint) needs --resume")
    data = PreparedData.open(data_dir)
    check_compatible(cfg, tc, data)
    d = distributed.setup(tc.device)
    try:
        with RunFolder(Path(run_dir)).lock() if d.main else contextlib.nullcontext():
            s = _begin(data, Path(run_dir), cfg, tc, resume, log, d, from_checkpoint, new_data)
            return _steps(s, data, log)
    finally:
        distributed.teardown(d)


@dataclass
class _Session:
    """What one training process carries from step to step."""

    model: Transformer
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None  # fp16 only
    dtype: torch.dtype | None  # autocast dtype, None for fp32
    d: distributed.Dist
    tc: TrainConfig
    run_dir: Path
    fwd: torch.nn.Module | CompiledOrEager | None = None  # the model as called: DDP-wrapped, compiled
    ddp: DistributedDataParallel | None = None
    step: int = 0
    elapsed: float = 0.0


def _begin(
    data: PreparedData,
    run_dir: Path,
    cfg: ModelConfig,
    tc: TrainConfig,
    resume: bool,
    log: Callable[[str], None],
    d: distributed.Dist,
    from_checkpoint: str | None,
    new_data: bool,
) -> _Session:
    """The run folder checked (and written, for a new run), the model built, a checkpoint restored on resume."""
    meta = resume_checks.start(run_dir, cfg, tc, data, resume, new_data) if d.main else {}
    distributed.barrier(d)
    s = _build(cfg, tc, d, run_dir)
    ckpt = RunFolder(run_dir).checkpoint(from_checkpoint) if resume else None
    if ckpt is not None:
        _restore(s, ckpt)
        log(f"resuming {run_dir} from step {s.step} ({ckpt.name}) on {data.root}")
    if d.main:  # a resume that failed to load has left run.json as it was
        RunFolder(run_dir).write_meta(meta)
        RunFolder(run_dir).truncate_metrics(s.step)
    _wrap(s, log)
    return s


def _steps(s: _Session, data: PreparedData, log: Callable[[str], None]) -> dict[str, object]:
    """Train to the last step: log, evaluate and checkpoint at their intervals; returns the final metrics."""
    tc, d, run_dir = s.tc, s.d, s.run_dir
    shards, val_shards = data.shards("train"), data.shards("val")
    val_bytes = token_bytes(data.tokenizer())  # for bits per byte
    flops_per_token = 3 * accounting.flops_per_token(s.model.cfg, tc.seq_len)  # forward + backward
    speed = _Speed()
    last: dict[str, object] = {"step": s.step}
    where = describe(d.device, d.world)  # in each training record: a resumed run may have moved machines
    total = tc.steps
    s.model.train()
    with _Recorder(run_dir if d.main else None) as recorder, Progress(f"train {run_dir.name}", total=total) as bar:
        bar.set(s.step)
        while s.step < total:
            t0 = time.perf_counter()
            lr, train_loss, norm, cvs = _train_step(s, shards)
            dt = time.perf_counter() - t0
            s.elapsed += dt
            speed.add(tc.tokens_per_step, dt)
            tps = speed.tokens_per_s  # over the steps since the last logged one
            bar.set(s.step, f"loss {train_loss:.3f} | {tps:,.0f} tok/s")
            eta = duration(speed.seconds_for(total - s.step))
            if d.main and speed.session_steps == 1 and s.step < total:  # how long this will take, up front
                log(f"step {s.step}/{total} took {dt:.1f} s ({tc.tokens_per_step / dt:,.0f} tok/s, warm-up included): "
                    f"about {eta} for the remaining {total - s.step} steps")  # fmt: skip
            if s.step % tc.log_interval == 0 or s.step == total:
                last = {
                    "step": s.step, "split": "train", "loss": train_loss, "lr": lr, "grad_norm": norm,
                    "tokens": s.step * tc.tokens_per_step, "tokens_per_s": tps,
                    "mfu_flops_per_s": tps * flops_per_token, "elapsed_s": s.elapsed,
                    "load_cv": cvs or None, "device": where,
                }  # fmt: skip
                recorder.record(last)
                speed.new_window()
            if d.main and (s.step % tc.eval_interval == 0 or s.step == total):
                ev = evaluate(
                    s.model, val_shards, seq_len=tc.seq_len, batch_size=tc.micro_batch_size, max_tokens=tc.eval_tokens,
                    device=d.device, dtype=s.dtype, token_bytes=val_bytes,
                )  # fmt: skip
                recorder.record({"step": s.step, "split": "val", **ev})
                last = {**last, **{k: v for k, v in ev.items() if k != "tokens"}, "val_tokens": ev["tokens"]}
                log(_eval_line(s.step, total, train_loss, ev, tps, eta))
            if s.step % tc.ckpt_interval == 0 or s.step == total:
                _save(s, train_loss)
    return last


def _build(cfg: ModelConfig, tc: TrainConfig, d: distributed.Dist, run_dir: Path) -> _Session:
    """The model (identical initial weights on every process), its optimizer and, for fp16, a loss scaler."""
    torch.manual_seed(tc.seed)
    model = Transformer(cfg).to(d.device)
    dtype = amp_dtype(d.device, tc.amp)
    scaler = torch.amp.GradScaler(d.device.type) if dtype == torch.float16 else None
    if d.rank:
        torch.manual_seed(tc.seed + d.rank)  # different dropout masks per process
    return _Session(model, build_optimizer(model, tc), scaler, dtype, d, tc, run_dir)


def _restore(s: _Session, ckpt: Path) -> None:
    """Weights, optimizer, scaler, RNG state and step of a checkpoint: the run goes on bitwise as if never stopped."""
    checkpoint.load_weights(ckpt, s.model)
    extra, state = checkpoint.load(ckpt)
    if "optimizer" not in extra:  # weights only (`moemla import`): fine-tuning starts a fresh optimizer
        s.step, s.elapsed = int(state["step"]), float(state["elapsed_s"])
        return
    s.optimizer.load_state_dict(extra["optimizer"])
    if s.scaler is not None and extra.get("scaler"):
        s.scaler.load_state_dict(extra["scaler"])
    rng = extra["rng"]
    if len(rng) == s.d.world:
        torch.set_rng_state(rng[s.d.rank])
    s.step, s.elapsed = int(state["step"]), float(state["elapsed_s"])


def _wrap(s: _Session, log: Callable[[str], None]) -> None:
    """The model as the steps call it: under DDP with several processes, compiled where asked (default: CUDA)."""
    s.fwd = s.model
    if s.d.world > 1:  # buffers are not broadcast: routing biases stay equal through all-reduced loads instead
        s.fwd = s.ddp = DistributedDataParallel(s.model, broadcast_buffers=False)
    if s.tc.compile or (s.tc.compile is None and s.d.device.type == "cuda"):
        s.fwd = CompiledOrEager(
            s.fwd, log=log, then="training continues without it (pass --compile false to skip the attempt)"
        )


def _train_step(s: _Session, shards: list) -> tuple[float, float, float, list[float]]:
    """One optimizer step over the accumulated micro-batches; returns lr, train loss, grad norm, load CVs."""
    tc, d = s.tc, s.d
    accum = tc.accumulation(d.world)
    lr = lr_at(s.step, tc)
    for group in s.optimizer.param_groups:
        group["lr"] = lr
    loss_sum = torch.zeros((), device=d.device)
    for m in range(accum):
        first = (m * d.world + d.rank) * tc.micro_batch_size
        rows = slice(first, first + tc.micro_batch_size)
        x, y = train_batch(shards, tc.seq_len, seed=tc.seed, step=s.step, batch=tc.batch_size, rows=rows)
        sync = m == accum - 1 or d.world == 1
        ctx = s.ddp.no_sync() if not sync and s.ddp is not None else contextlib.nullcontext()
        with ctx, autocast(d.device, s.dtype):
            _, loss = s.fwd(*_to_device(d.device, x, y))  # type: ignore[misc]
        scaled = loss / accum
        (s.scaler.scale(scaled) if s.scaler is not None else scaled).backward()
        loss_sum += loss.detach()
    if s.scaler is not None:
        s.scaler.unscale_(s.optimizer)
    params = [p for p in s.model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip if tc.grad_clip > 0 else math.inf)
    if s.scaler is not None:
        s.scaler.step(s.optimizer)
        s.scaler.update()
    else:
        s.optimizer.step()
    s.optimizer.zero_grad(set_to_none=True)
    # Algorithm 1: one bias update per optimizer step, from the loads of every micro-batch and process
    distributed.all_reduce_sum([moe.train_load for moe in s.model.moe_layers()] + [loss_sum], d)
    cvs = s.model.routing_bias_step()
    # NOTE: the step's one host sync, after every kernel of the step is queued: loss, norm and CVs in one
    # transfer. A non-finite loss or norm stops the run before anything is saved, so the weights this step
    # wrote never reach a checkpoint (with fp16's scaler an inf norm is a skipped step, not a divergence).
    loss, grad_norm, *cv = torch.cat([loss_sum.view(1).double(), norm.view(1).double(), cvs.to(d.device)]).tolist()
    loss /= accum * d.world
    if not math.isfinite(loss):
        raise TrainingDiverged(_diverged(s.run_dir, s.step + 1, f"the loss became {loss}"))
    if s.scaler is None and not math.isfinite(grad_norm):
        raise TrainingDiverged(_diverged(s.run_dir, s.step + 1, f"the gradient norm became {grad_norm}"))
    s.step += 1
    return lr, loss, grad_norm, cv


def _save(s: _Session, train_loss: float) -> None:
    """A checkpoint with every process's RNG state, written by the main process."""
    rng = distributed.gather_objects(torch.get_rng_state(), s.d)
    if s.d.main:
        extra = {"optimizer": s.optimizer.state_dict(), "scaler": s.scaler.state_dict() if s.scaler else {}}
        state = {"step": s.step, "elapsed_s": s.elapsed, "train_loss": train_loss}
        RunFolder(s.run_dir).save_checkpoint(s.step, s.model, {**extra, "rng": rng}, state, s.tc.keep_checkpoints)
    distributed.barrier(s.d)


class _Speed:
    """Tokens/s since the last logged step, and this process's mean step time for the ETA."""

    def __init__(self) -> None:
        self.window_tokens, self.window_time = 0, 0.0
        self.session_steps, self.session_time = 0, 0.0

    def add(self, tokens: int, seconds: float) -> None:
        self.window_tokens += tokens
        self.window_time += seconds
        self.session_steps += 1
        self.session_time += seconds

    @property
    def tokens_per_s(self) -> float:
        return self.window_tokens / self.window_time

    def seconds_for(self, steps: int) -> float:
        return steps * self.session_time / self.session_steps

    def new_window(self) -> None:
        self.window_tokens, self.window_time = 0, 0.0


class _Recorder:
    """metrics.jsonl, and TensorBoard where installed; None on non-main processes (records nothing)."""

    def __init__(self, run_dir: Path | None) -> None:
        self.metrics = RunFolder(run_dir).metrics_file() if run_dir is not None else None
        self.writer = _tensorboard(run_dir) if run_dir is not None else None

    def record(self, row: dict[str, object]) -> None:
        if self.metrics is not None:
            self.metrics.write(json.dumps(row) + "\n")
            self.metrics.flush()
        if self.writer is not None:
            for k, v in row.items():
                if isinstance(v, int | float) and k != "step":
                    self.writer.add_scalar(f"{row['split']}/{k}", v, row["step"])  # type: ignore[attr-defined]

    def __enter__(self) -> _Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.metrics is not None:
            self.metrics.close()
        if self.writer is not None:
            self.writer.close()  # type: ignore[attr-defined]


def _eval_line(step: int, total: int, train_loss: float, ev: dict, tps: float, eta: str) -> str:
    cv = f" | load CV {max(ev['expert_load_cv']):.3f}" if ev["expert_load_cv"] else ""
    return (
        f"step {step}/{total} | train loss {train_loss:.4f} | val loss {ev['val_loss']:.4f} "
        f"(ppl {ev['val_ppl']:.2f}){cv} | {tps:,.0f} tok/s | ETA {eta}"
    )


def _to_device(device: torch.device, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Host batches to the training device; on CUDA from pinned memory, so the copy overlaps the GPU's work."""
    if device.type != "cuda":
        return tensors
    return tuple(t.pin_memory().to(device, non_blocking=True) for t in tensors)


def _diverged(run_dir: Path, step: int, what: str) -> str:
    good = RunFolder(run_dir).latest_checkpoint()
    kept = f"the last good checkpoint is {good}" if good else "no checkpoint was written yet"
    return f"{what} at step {step}; training stopped ({kept}). Try a lower --lr or --grad-clip, or --amp none"
