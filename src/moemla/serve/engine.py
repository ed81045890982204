"""The server's decoder: one worker thread owns the model and decodes queued requests in batches.

Requests that arrive together (within `window_s`, up to `max_batch`) share one left-padded batch of a
TorchDecoder (the one Decoder interface); each row keeps its own sampling settings, seed, token budget and cancel flag.
Requests that arrive while a batch runs wait for the next one.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from moemla.inference.decoder import Mode, TorchDecoder
from moemla.inference.sampling import SamplingConfig, sample
from moemla.model import Transformer


@dataclass
class Token:
    """One token of a row: a prompt token (echo) or a sampled one, with its log-probability and top alternatives."""

    id: int
    logprob: float | None  # None for the first prompt token, which nothing predicts
    top: list[tuple[int, float]] = field(default_factory=list)
    prompt: bool = False


@dataclass
class Finish:
    reason: str  # stop (end of text or a stop string), length (budget or context), cancelled, error
    error: str | None = None


Event = Token | Finish


@dataclass
class Job:
    """One sequence to continue; `emit` is called from the worker thread with each Token, then one Finish."""

    prompt: list[int]
    max_tokens: int
    emit: Callable[[Event], None]
    temperature: float = SamplingConfig.temperature
    top_k: int | None = SamplingConfig.top_k
    top_p: float | None = SamplingConfig.top_p
    seed: int = SamplingConfig.seed
    logprobs: int | None = None  # alternatives per token to report (0: only the chosen token's logprob)
    echo: bool = False  # report the prompt's tokens and their logprobs first
    cancelled: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        if not self.prompt:
            raise ValueError("the prompt is empty; give at least one token")
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if self.max_tokens:  # 0 scores the prompt only (echo): nothing is sampled
            SamplingConfig(self.temperature, self.top_k, self.top_p, self.max_tokens, self.seed)


def _top(logprobs: torch.Tensor, n: int | None) -> list[tuple[int, float]]:
    if not n:
        return []
    values, ids = logprobs.topk(n)
    return list(zip(ids.tolist(), values.tolist(), strict=True))


class Engine:
    """Batches jobs through a Transformer on its own thread; `submit` returns at once."""

    def __init__(
        self,
        model: Transformer,
        stop: int | None,
        max_batch: int = 16,
        window_s: float = 0.005,
        mode: Mode = "eager",
        compile: bool = False,
    ) -> None:
        self.model, self.stop = model.eval(), stop
        # generation goes through the one Decoder interface
        self.decoder = TorchDecoder(self.model, mode=mode, compile=compile)
        self.max_batch, self.window_s = max_batch, window_s
        self.device = next(model.parameters()).device
        self.stats = {"batches": 0, "jobs": 0, "largest_batch": 0, "cancelled": 0, "tokens": 0}
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="moemla-engine", daemon=True)
        self._thread.start()

    @property
    def context(self) -> int:
        return self.model.cfg.max_seq_len

    def submit(self, jobs: list[Job]) -> None:
        for job in jobs:
            if len(job.prompt) > self.context or (job.max_tokens and len(job.prompt) >= self.context):
                raise ValueError(
                    f"the prompt has {len(job.prompt)} tokens but the model's context is {self.context} tokens"
                )
        for job in jobs:
            self._queue.put(job)

    def _score(self, job: Job) -> None:
        """Emit the prompt's tokens with the log-probability the model gives each after its prefix."""
        ids = torch.tensor([job.prompt], device=self.device)
        lp = self.model(ids)[0][0, :-1].float().log_softmax(-1)  # (T - 1, V)
        job.emit(Token(job.prompt[0], None, prompt=True))
        for t, token in enumerate(job.prompt[1:]):
            job.emit(Token(token, float(lp[t, token]), _top(lp[t], job.logprobs), prompt=True))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            jobs, deadline = [job], time.monotonic() + self.window_s
            while len(jobs) < self.max_batch:
                try:
                    nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)  # stop after this batch
                    break
                jobs.append(nxt)
            try:
                self._run(jobs)
            except Exception as err:  # a failed batch must not kill the server: its clients get the error
                for j in jobs:
                    j.emit(Finish("error", f"{type(err).__name__}: {err}"))

    @torch.no_grad()
    def _run(self, jobs: list[Job]) -> None:
        self.stats["batches"] += 1
        self.stats["jobs"] += len(jobs)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(jobs))
        for job in jobs:
            if job.echo:  # the prompt's tokens as scored by the model: what lm-eval's loglikelihood reads
                self._score(job)
        longest = max(len(j.prompt) for j in jobs)
        budget = max(j.max_tokens for j in jobs)
        last = torch.as_tensor(self.decoder.prefill([j.prompt for j in jobs], min(self.context, longest + budget)))
        generators = [torch.Generator(device=self.device).manual_seed(j.seed) for j in jobs]
        made = [0] * len(jobs)
        done = [False] * len(jobs)
        for i, job in enumerate(jobs):
            if job.max_tokens == 0:
                done[i] = True
                job.emit(Finish("length"))
        while not all(done):
            step = []
            for i, job in enumerate(jobs):
                if done[i]:
                    step.append(self.stop or 0)
                    continue
                if job.cancelled.is_set():
                    done[i] = True
                    self.stats["cancelled"] += 1
                    job.emit(Finish("cancelled"))
                    step.append(self.stop or 0)
                    continue
                token = int(sample(last[i : i + 1], job.temperature, job.top_k, job.top_p, generators[i]))
                lp = last[i].float().log_softmax(-1)
                job.emit(Token(token, float(lp[token]), _top(lp, job.logprobs)))
                made[i] += 1
                self.stats["tokens"] += 1
                step.append(token)
                if token == self.stop or made[i] == job.max_tokens:
                    done[i] = True
                    job.emit(Finish("stop" if token == self.stop else "length"))
            if all(done):
                break
            if self.decoder.length == self.decoder.max_len:  # the context is full
                for i, job in enumerate(jobs):
                    if not done[i]:
                        done[i] = True
                        job.emit(Finish("length"))
                break
            last = torch.as_tensor(self.decoder.step(step))  # (B, V)
