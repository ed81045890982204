"""What `moemla serve` does with a request, past the wire format: prompts to token ids (off the event loop),
jobs for the batching engine, and the engine's events back as each choice's text."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator

from tokenizers import Tokenizer

from moemla.data.tokenizer import eot_id
from moemla.inference.decode import Event, Finish, Token
from moemla.inference.sampling import PromptTooLong, fit
from moemla.serve.engine import Engine, Job
from moemla.serve.limits import PromptEncoder
from moemla.serve.protocol import ChoiceText, CompletionRequest, Sampling


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


async def encode_prompts(req: CompletionRequest, encoder: PromptEncoder, vocab: int) -> list[list[int]]:
    """The request's prompts as token ids: one string, several, one id list, or several."""
    p = req.prompt
    if isinstance(p, str) or (p and all(isinstance(x, int) for x in p)):
        p = [p]  # type: ignore[list-item]
    texts = [x for x in p if isinstance(x, str)]
    encoded = iter(await encode_texts(encoder, texts))
    prompts = [next(encoded) if isinstance(x, str) else list(x) for x in p]
    if not prompts or any(not ids for ids in prompts):
        raise ApiError(400, "prompt is empty; give at least one token of text")
    if any(not 0 <= t < vocab for ids in prompts for t in ids):
        raise ApiError(400, f"prompt token ids must be in [0, {vocab})")
    return prompts


async def encode_texts(encoder: PromptEncoder, texts: list[str]) -> list[list[int]]:
    try:
        return await encoder.encode(texts)
    except ValueError as err:
        raise ApiError(400, str(err), "context_length_exceeded") from None


MAX_ROWS = 256  # sequences (prompts x n) one request may ask for: `moemla serve --max-rows-per-request`


class Server:
    """Turns requests into engine jobs and engine events into OpenAI responses."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, name: str, max_rows: int = MAX_ROWS) -> None:
        self.engine, self.tok, self.name, self.max_rows = engine, tokenizer, name, max_rows
        self.encoder = PromptEncoder(tokenizer, engine.context)
        self.stop = eot_id(tokenizer)
        self.seeds = itertools.count(1)
        self.created = int(time.time())

    def jobs(self, req: Sampling, prompts: list[list[int]], max_tokens: int, **extra: object) -> list[Job]:
        if req.model != self.name:
            raise ApiError(
                404, f"model {req.model!r} does not exist; this server serves {self.name!r}", "model_not_found"
            )
        rows = len(prompts) * req.n
        if rows > self.max_rows:
            raise ApiError(400, f"this request asks for {rows:,} sequences ({len(prompts):,} prompts x n = {req.n}); "
                           f"the server takes at most {self.max_rows:,} per request (moemla serve "
                           "--max-rows-per-request): split it into smaller requests", "too_many_rows")  # fmt: skip
        seed = req.seed if req.seed is not None else next(self.seeds) * 1000
        try:
            sampling = [req.sampling(max_tokens, seed + k) for k in range(req.n)]
        except ValueError as err:
            raise ApiError(400, _as_field(str(err))) from None
        return [Job(p, s, _unbound, **extra) for p in prompts for s in sampling]  # type: ignore[arg-type]

    async def events(self, jobs: list[Job]) -> AsyncIterator[tuple[int, Event]]:
        """(choice index, event) as the engine produces them; leaving early cancels every unfinished row."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        for i, job in enumerate(jobs):
            job.emit = lambda event, i=i: loop.call_soon_threadsafe(queue.put_nowait, (i, event))
        try:
            self.engine.submit(jobs)
        except ValueError as err:
            raise ApiError(400, str(err), "context_length_exceeded") from None
        left = len(jobs)
        try:
            while left:
                i, event = await queue.get()
                left -= isinstance(event, Finish)
                if isinstance(event, Finish) and event.reason == "error":
                    raise ApiError(500, f"generation failed: {event.error}")
                yield i, event
        finally:
            for job in jobs:  # a client that went away stops its rows at the next decode step
                job.cancelled.set()

    async def pieces(
        self, jobs: list[Job], texts: list[ChoiceText], echoed: list[list[Token]] | None = None
    ) -> AsyncIterator[tuple[int, str, str | None]]:
        """(choice, new text, finish reason or None) for each generated event; echoed prompt tokens go to
        `echoed`, and a stop string found in a choice's text cancels its row."""
        async for i, event in self.events(jobs):
            if isinstance(event, Finish):
                yield i, texts[i].flush(), finish_reason(texts[i], event)
            elif event.prompt:
                echoed[i].append(event)  # type: ignore[index]
            else:
                piece = texts[i].add(event)
                if texts[i].stopped:
                    jobs[i].cancelled.set()
                yield i, piece, None

    def max_tokens(self, prompts: list[list[int]], requested: int | None) -> int:
        """Tokens to generate: as requested, cut to what the context leaves (then finish_reason is length)."""
        longest = max(len(p) for p in prompts)
        wanted = self.engine.context if requested is None else requested
        try:
            return fit(longest, self.engine.context, wanted)
        except PromptTooLong as err:
            raise ApiError(400, str(err), "context_length_exceeded") from None


def _as_field(message: str) -> str:
    """SamplingConfig's message about a flag ('--top-k must ...') as one about the request's field ('top_k ...')."""
    flag, _, rest = message.partition(" ")
    name = {"--max-new-tokens": "max_tokens"}.get(flag, flag.removeprefix("--").replace("-", "_"))
    return f"{name} {rest}"


def _unbound(event: Event) -> None:
    """A job's emit until Server.events connects it to the request's queue."""


def finish_reason(text: ChoiceText, event: Finish) -> str:
    return "stop" if text.stopped else event.reason


def usage(jobs: list[Job], texts: list[ChoiceText], n: int) -> dict[str, int]:
    prompt = sum(len(j.prompt) for j in jobs[::n])  # n choices share each prompt
    completion = sum(len(t.tokens) for t in texts)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
