"""The training loop: config, setup, data, model, optimizer, then steps with evaluation and checkpoints."""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from moemla import accounting
from moemla.config import ConfigError, ModelConfig
from moemla.data.shards import PreparedData, train_batch
from moemla.data.sources import DataError
from moemla.data.tokenizer import token_bytes
from moemla.eval.perplexity import amp_dtype, autocast, evaluate
from moemla.model import Transformer
from moemla.progress import Progress
from moemla.train import checkpoint, distributed, run_folder
from moemla.train.config import TrainConfig, build_optimizer, lr_at
from moemla.train.run_folder import METRICS_FILE, RunError, lock_run


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
        with lock_run(run_dir) if d.main else contextlib.nullcontext():
            return _train(data, Path(run_dir), cfg, tc, resume, log, d, from_checkpoint)
    finally:
        distributed.teardown(d)


def _train(
    data: PreparedData,
    run_dir: Path,
    cfg: ModelConfig,
    tc: TrainConfig,
    resume: bool,
    log: Callable[[str], None],
    d: distributed.Dist,
    from_checkpoint: str | None,
) -> dict[str, object]:
    accum = tc.accumulation(d.world)
    if d.main:
        run_folder.start(run_dir, cfg, tc, data, resume)
    distributed.barrier(d)
    torch.manual_seed(tc.seed)  # identical initial weights on every process
    model = Transformer(cfg).to(d.device)
    optimizer = build_optimizer(model, tc)
    dtype = amp_dtype(d.device, tc.amp)
    scaler = torch.amp.GradScaler(d.device.type) if dtype == torch.float16 else None
    if d.rank:
        torch.manual_seed(tc.seed + d.rank)  # different dropout masks per process

    step, elapsed = 0, 0.0
    ckpt = checkpoint.find(run_dir, from_checkpoint) if resume else None
    if ckpt is not None:
        checkpoint.load_weights(ckpt, model)
        extra, state = checkpoint.load(ckpt)
        optimizer.load_state_dict(extra["optimizer"])
        if scaler is not None and extra.get("scaler"):
            scaler.load_state_dict(extra["scaler"])
        rng = extra["rng"]
        if len(rng) == d.world:
            torch.set_rng_state(rng[d.rank])
        step, elapsed = int(state["step"]), float(state["elapsed_s"])
        log(f"resuming {run_dir} from step {step} ({ckpt.name})")
    if d.main:
        run_folder.truncate_metrics(run_dir / METRICS_FILE, step)

    fwd: torch.nn.Module | _CompiledOrEager = model
    if d.world > 1:  # buffers are not broadcast: routing biases stay equal through all-reduced loads instead
        fwd = DistributedDataParallel(model, broadcast_buffers=False)
    ddp = fwd if isinstance(fwd, DistributedDataParallel) else None
    if tc.compile or (tc.compile is None and d.device.type == "cuda"):
        fwd = _CompiledOrEager(fwd, log)
    shards = data.shards("train")
    val_shards = data.shards("val")
    val_bytes = token_bytes(data.tokenizer())  # for bits per byte
    total = tc.steps
    flops_per_token = 3 * accounting.flops_per_token(cfg, tc.seq_len)  # forward + backward
    writer = _tensorboard(run_dir) if d.main else None
    metrics = (run_dir / METRICS_FILE).open("a") if d.main else None
    last: dict[str, object] = {"step": step}
    window_tokens, window_time = 0, 0.0
    session_steps, session_time = 0, 0.0  # steps run by this process, for the ETA

    def record(row: dict[str, object]) -> None:
        if metrics is not None:
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
        if writer is not None:
            for k, v in row.items():
                if isinstance(v, int | float) and k != "step":
                    writer.add_scalar(f"{row['split']}/{k}", v, row["step"])

    model.train()
    with Progress(f"train {run_dir.name}", total=total) as bar:
        bar.set(step)
        while step < total:
            t0 = time.perf_counter()
            lr = lr_at(step, tc)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=d.device)
            for m in range(accum):
                first = (m * d.world + d.rank) * tc.micro_batch_size
                x, y = train_batch(
                    shards, tc.seq_len, tc.seed, step, tc.batch_size, slice(first, first + tc.micro_batch_size)
                )
                sync = m == accum - 1 or d.world == 1
                ctx = ddp.no_sync() if not sync and ddp is not None else contextlib.nullcontext()
                with ctx, autocast(d.device, dtype):
                    _, loss = fwd(*_to_device(d.device, x, y))
                scaled = loss / accum
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
                loss_sum += loss.detach()
            # NOTE: one check per step, not per micro-batch: reading the loss waits for the GPU to finish
            if not torch.isfinite(loss_sum):
                raise TrainingDiverged(_diverged(run_dir, step + 1, f"the loss became {float(loss_sum) / accum}"))
            if scaler is not None:
                scaler.unscale_(optimizer)
            params = [p for p in model.parameters() if p.grad is not None]
            norm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip if tc.grad_clip > 0 else math.inf)
            if scaler is None and not torch.isfinite(norm):
                raise TrainingDiverged(_diverged(run_dir, step + 1, f"the gradient norm became {float(norm)}"))
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            # Algorithm 1: one bias update per optimizer step, from the loads of every micro-batch and process
            distributed.all_reduce_sum([moe.train_load for moe in model.moe_layers()] + [loss_sum], d)
            cvs = model.update_routing_biases()
            step += 1
            dt = time.perf_counter() - t0
            elapsed += dt
            window_tokens += tc.tokens_per_step
            window_time += dt
            train_loss = float(loss_sum) / (accum * d.world)
            tps = window_tokens / window_time
            bar.set(step, f"loss {train_loss:.3f} | {tps:,.0f} tok/s")
            session_steps, session_time = session_steps + 1, session_time + dt
            eta = _duration((total - step) * session_time / session_steps)
            if d.main and session_steps == 1 and step < total:  # how long this will take, before the user waits for it
                log(f"step {step}/{total} took {dt:.1f} s ({tc.tokens_per_step / dt:,.0f} tok/s, warm-up included): "
                    f"about {eta} for the remaining {total - step} steps")  # fmt: skip

            if step % tc.log_interval == 0 or step == total:
                last = {
                    "step": step, "split": "train", "loss": train_loss, "lr": lr, "grad_norm": float(norm),
                    "tokens": step * tc.tokens_per_step, "tokens_per_s": tps, "mfu_flops_per_s": tps * flops_per_token,
                    "elapsed_s": elapsed, "load_cv": cvs or None,
                }  # fmt: skip
                record(last)
                window_tokens, window_time = 0, 0.0
            if d.main and (step % tc.eval_interval == 0 or step == total):
                ev = evaluate(
                    model, val_shards, tc.seq_len, tc.micro_batch_size, tc.eval_tokens, d.device, dtype, val_bytes
                )
                record({"step": step, "split": "val", **ev})
                last = {**last, **{k: v for k, v in ev.items() if k != "tokens"}, "val_tokens": ev["tokens"]}
                cv = f" | load CV {max(ev['expert_load_cv']):.3f}" if ev["expert_load_cv"] else ""
                log(
                    f"step {step}/{total} | train loss {train_loss:.4f} | val loss {ev['val_loss']:.4f} "
                    f"(ppl {ev['val_ppl']:.2f}){cv} | {tps:,.0f} tok/s | ETA {eta}"
                )
            if step % tc.ckpt_interval == 0 or step == total:
                rng = distributed.gather_objects(torch.get_rng_state(), d)
                if d.main:
                    extra = {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler else {}}
                    state = {"step": step, "elapsed_s": elapsed, "train_loss": train_loss}
                    checkpoint.save(run_dir, step, model, {**extra, "rng": rng}, state, tc.keep_checkpoints)
                distributed.barrier(d)
    if metrics is not None:
        metrics.close()
    if writer is not None:
        writer.close()  # type: ignore[attr-defined]
    return last


def _duration(seconds: float) -> str:
    """3 h 05 min, 4 min 10 s, 12 s."""
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 60} min {s % 60:02d} s" if s >= 60 else f"{s} s"


def _to_device(device: torch.device, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Host batches to the training device; on CUDA from pinned memory, so the copy overlaps the GPU's work."""
    if device.type != "cuda":
        return tensors
    return tuple(t.pin_memory().to(device, non_blocking=True) for t in tensors)


class _CompiledOrEager:
    """torch.compile(module); if compiling fails at the first call (no C compiler, no Triton), it says so once
    and runs the module eagerly."""

    def __init__(self, module: torch.nn.Module, log: Callable[[str], None]) -> None:
        self.module, self.run, self.log, self.tried = module, torch.compile(module), log, False

    def __call__(self, *args: torch.Tensor) -> tuple:
        if self.tried:
            return self.run(*args)
        self.tried = True
        try:
            return self.run(*args)
        except Exception as err:  # inductor raises many kinds; each means: run eagerly
            first = str(err).splitlines()[0][:200] if str(err) else ""
            self.log(
                f"torch.compile is unavailable here ({type(err).__name__}: {first}); training continues without it "
                "(pass --compile false to skip the attempt)"
            )
            self.run = self.module
            return self.run(*args)


def _diverged(run_dir: Path, step: int, what: str) -> str:
    good = checkpoint.latest(run_dir)
    kept = f"the last good checkpoint is {good}" if good else "no checkpoint was written yet"
    return f"{what} at step {step}; training stopped ({kept}). Try a lower --lr or --grad-clip, or --amp none"
