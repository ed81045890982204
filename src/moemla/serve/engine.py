"""The server's decoder: one worker thread owns the model and decodes queued requests in batches.

Requests that arrive together (within `window_s`, up to `max_batch`) share one left-padded batch of a
TorchDecoder (the one Decoder interface) through the one decode loop (inference/decode.py); each row keeps its own
sampling settings, seed, token budget and cancel flag.
Requests that arrive while a batch runs wait for the next one. Batches are filled fairly: one row of each waiting
request in turn (round robin, in order of arrival), so a request of many rows cannot make a small one sent after
it wait for all of its rows; it waits at most for the batch that is running.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from moemla.inference.decode import Event, Finish, Row, Token, decode, top_logprobs
from moemla.inference.decoder import Decoder
from moemla.inference.sampling import SamplingConfig, fit
from moemla.inference.torch_decoder import Mode, TorchDecoder
from moemla.model import Transformer


@dataclass
class Job:
    """One sequence to continue; `emit` is called from the worker thread with each Token, then one Finish."""

    prompt: list[int]
    sampling: SamplingConfig  # its max_new_tokens may be 0: the prompt is only scored (echo)
    emit: Callable[[Event], None]
    logprobs: int | None = None  # alternatives per token to report (0: only the chosen token's; None: no logprobs)
    echo: bool = False  # report the prompt's tokens and their logprobs first
    cancelled: threading.Event = field(default_factory=threading.Event)
    started: bool = field(default=False, init=False)  # the engine has emitted something of it

    def row(self) -> Row:
        """The job as a row of the one decode loop."""
        return Row(self.prompt, self.sampling, logprobs=self.logprobs)


class Engine:
    """Batches jobs through a Transformer on its own thread; `submit` returns at once."""

    def __init__(
        self,
        model: Transformer | Decoder,
        stop: int | None,
        max_batch: int = 16,
        window_s: float = 0.005,
        mode: Mode = "eager",
        compile: bool = False,
    ) -> None:
        self.stop = stop
        # generation and prompt scoring go through the one Decoder interface (a Transformer gets TorchDecoder)
        self.decoder = TorchDecoder(model, mode=mode, compile=compile) if isinstance(model, Transformer) else model
        self.cfg = self.decoder.cfg
        self.max_batch = max_batch if self.decoder.max_batch is None else min(max_batch, self.decoder.max_batch)
        self.window_s = window_s
        self.stats = {"batches": 0, "jobs": 0, "largest_batch": 0, "cancelled": 0, "tokens": 0}
        self._waiting: dict[int, deque[Job]] = {}  # request -> its jobs not yet in a batch, in arrival order
        self._requests = 0
        self._closed = False
        self._ready = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="moemla-engine", daemon=True)
        self._thread.start()

    @property
    def context(self) -> int:
        return self.cfg.max_seq_len

    def submit(self, jobs: list[Job]) -> None:
        """Queue one request's jobs (its prompts x n); they share batches fairly with other requests' jobs."""
        for job in jobs:  # the one fit check (PromptTooLong, a ValueError), before any job is queued
            fit(len(job.prompt), self.context, job.sampling.max_new_tokens)
        if not jobs:
            return
        with self._ready:
            self._requests += 1
            self._waiting[self._requests] = deque(jobs)
            self._ready.notify()

    def _take(self, limit: int) -> list[Job]:
        """Up to `limit` waiting jobs, one per request in turn (the caller holds the lock)."""
        taken: list[Job] = []
        while len(taken) < limit and self._waiting:
            for request in list(self._waiting):
                if len(taken) == limit:
                    break
                jobs = self._waiting[request]
                taken.append(jobs.popleft())
                if not jobs:
                    del self._waiting[request]
        return taken

    @property
    def waiting(self) -> int:
        with self._ready:
            return sum(len(q) for q in self._waiting.values())

    def _score(self, job: Job) -> None:
        """Emit the prompt's tokens with the log-probability the model gives each after its prefix."""
        lp = self.decoder.logits(job.prompt)[:-1].float().log_softmax(-1)  # (T - 1, V)
        job.emit(Token(job.prompt[0], None, prompt=True))
        for t, token in enumerate(job.prompt[1:]):
            job.emit(Token(token, float(lp[t, token]), top_logprobs(lp[t], job.logprobs), prompt=True))

    def close(self) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while True:
            with self._ready:
                while not self._waiting and not self._closed:
                    self._ready.wait()
                if not self._waiting:
                    return  # closed, nothing left
                # requests arriving within the window join this batch (one lone request need not wait for more)
                deadline = time.monotonic() + self.window_s
                while self.waiting < self.max_batch and (left := deadline - time.monotonic()) > 0:
                    self._ready.wait(left)
                jobs = self._take(self.max_batch)
            self._run_isolated(jobs)

    def _run_isolated(self, jobs: list[Job]) -> None:
        """Run a batch; if it raises, each job that had received nothing yet runs again alone, so a row that raises
        fails its own request and never its batch-mates (a job already streaming gets the error). A failed batch
        never kills the server."""
        try:
            self._run(jobs)
        except Exception as err:
            for j in jobs:
                if j.started or len(jobs) == 1:
                    j.emit(Finish("error", f"{type(err).__name__}: {err}"))
                else:
                    self._run_isolated([j])

    @torch.no_grad()
    def _run(self, jobs: list[Job]) -> None:
        self.stats["batches"] += 1
        self.stats["jobs"] += len(jobs)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(jobs))
        for job in jobs:
            if job.echo:  # the prompt's tokens as scored by the model: what lm-eval's loglikelihood reads
                job.started = True
                self._score(job)
        rows = [job.row() for job in jobs]
        for i, event in decode(self.decoder, rows, self.stop, lambda i: jobs[i].cancelled.is_set()):
            if isinstance(event, Token):
                self.stats["tokens"] += 1
            elif event.reason == "cancelled":
                self.stats["cancelled"] += 1
            jobs[i].started = True
            jobs[i].emit(event)
