"""`moemla serve`: an OpenAI-compatible HTTP server (FastAPI) over the batching engine.

/v1/models, /v1/completions (logprobs, echo: what lm-eval's local-completions reads) and /v1/chat/completions,
each streaming as server-sent events on request. Bad requests get OpenAI-style 4xx JSON errors.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException
from tokenizers import Tokenizer

from moemla.data.tokenizer import eot_id
from moemla.serve.engine import Engine, Event, Finish, Job, Token
from moemla.serve.limits import BodyLimit, PromptEncoder
from moemla.serve.protocol import (
    ChatRequest,
    ChoiceText,
    CompletionRequest,
    Sampling,
    chat_logprobs,
    completion_logprobs,
    error_body,
)


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


async def _prompts(req: CompletionRequest, encoder: PromptEncoder, vocab: int) -> list[list[int]]:
    """The request's prompts as token ids: one string, several, one id list, or several."""
    p = req.prompt
    if isinstance(p, str) or (p and all(isinstance(x, int) for x in p)):
        p = [p]  # type: ignore[list-item]
    texts = [x for x in p if isinstance(x, str)]
    encoded = iter(await _encode(encoder, texts))
    prompts = [next(encoded) if isinstance(x, str) else list(x) for x in p]
    if not prompts or any(not ids for ids in prompts):
        raise ApiError(400, "prompt is empty; give at least one token of text")
    if any(not 0 <= t < vocab for ids in prompts for t in ids):
        raise ApiError(400, f"prompt token ids must be in [0, {vocab})")
    return prompts


async def _encode(encoder: PromptEncoder, texts: list[str]) -> list[list[int]]:
    try:
        return await encoder.encode(texts)
    except ValueError as err:
        raise ApiError(400, str(err), "context_length_exceeded") from None


class Server:
    """Turns requests into engine jobs and engine events into OpenAI responses."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, name: str) -> None:
        self.engine, self.tok, self.name = engine, tokenizer, name
        self.encoder = PromptEncoder(tokenizer, engine.context)
        self.stop = eot_id(tokenizer)
        self.seeds = itertools.count(1)
        self.created = int(time.time())

    def jobs(self, req: Sampling, prompts: list[list[int]], max_tokens: int, **extra: object) -> list[Job]:
        if req.model != self.name:
            raise ApiError(
                404, f"model {req.model!r} does not exist; this server serves {self.name!r}", "model_not_found"
            )
        seed = req.seed if req.seed is not None else next(self.seeds) * 1000
        top_p = None if req.top_p >= 1.0 else req.top_p

        try:
            return [
                Job(p, max_tokens, _unbound, req.temperature, req.top_k, top_p, seed + k, **extra)  # type: ignore[arg-type]
                for p in prompts
                for k in range(req.n)
            ]
        except ValueError as err:
            raise ApiError(400, str(err)) from None

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
                yield i, texts[i].flush(), _finish(texts[i], event)
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
        room = self.engine.context - longest
        if room < 0 or (room == 0 and requested != 0):
            raise ApiError(
                400,
                f"the prompt has {longest} tokens but the model's context is {self.engine.context} tokens; "
                "shorten the prompt",
                "context_length_exceeded",
            )
        return room if requested is None else min(requested, room)


def _unbound(event: Event) -> None:
    """A job's emit until Server.events connects it to the request's queue."""


def _finish(text: ChoiceText, event: Finish) -> str:
    return "stop" if text.stopped else event.reason


def _sse(data: dict[str, object]) -> str:
    return f"data: {json.dumps(data)}\n\n"


def create_app(engine: Engine, tokenizer: Tokenizer, name: str, max_body_mb: float = 2.0) -> FastAPI:
    server = Server(engine, tokenizer, name)
    app = FastAPI(title="moemla", description=f"OpenAI-compatible server for {name}")
    app.add_middleware(BodyLimit, limit=int(max_body_mb * 2**20))
    app.state.server = server

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, err: ApiError) -> JSONResponse:
        kind = "invalid_request_error" if err.status < 500 else "server_error"
        return JSONResponse(error_body(err.message, kind, err.code), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        problems = []
        for e in err.errors():
            if e.get("type") == "json_invalid":
                why = (e.get("ctx") or {}).get("error", "")
                return JSONResponse(error_body(f"the request body is not valid JSON ({why})"), status_code=400)
            where = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            problems.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
        return JSONResponse(error_body("invalid request: " + "; ".join(problems)), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, err: HTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(err.detail)), status_code=err.status_code)

    @app.get("/health")
    async def health() -> dict[str, object]:
        return {"status": "ok", "model": name, **engine.stats}

    card = {"id": name, "object": "model", "created": server.created, "owned_by": "moemla"}
    card["max_model_len"] = engine.context

    @app.get("/v1/models")
    async def models() -> dict[str, object]:
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict[str, object]:
        if model != name:
            raise ApiError(404, f"model {model!r} does not exist; this server serves {name!r}", "model_not_found")
        return card

    @app.post("/v1/completions", response_model=None)
    async def completions(req: CompletionRequest) -> dict[str, object] | StreamingResponse:
        prompts = await _prompts(req, server.encoder, engine.model.cfg.vocab_size)
        max_tokens = server.max_tokens(prompts, req.max_tokens)
        jobs = server.jobs(req, prompts, max_tokens, logprobs=req.logprobs, echo=req.echo)
        texts = [ChoiceText(server.tok, req.stops(), server.stop) for _ in jobs]
        echoed: list[list[Token]] = [[] for _ in jobs]
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time())}
        head["model"] = name

        def prompt_text(i: int) -> str:
            return server.tok.decode(jobs[i].prompt) if req.echo else ""

        if req.stream:

            async def stream() -> AsyncIterator[str]:
                sent_prompt = [False] * len(jobs)
                reported = [0] * len(jobs)  # tokens whose logprobs went out, per choice
                offsets = [0 if req.echo else len(server.tok.decode(j.prompt)) for j in jobs]
                extra = {"usage": None} if req.include_usage() else {}
                async for i, piece, finish in server.pieces(jobs, texts, echoed):
                    if not sent_prompt[i]:  # an echoed prompt goes out with the choice's first chunk
                        piece, sent_prompt[i] = prompt_text(i) + piece, True
                    if piece or finish:
                        logprobs = None
                        if req.logprobs is not None:
                            new = (echoed[i] + texts[i].tokens)[reported[i] :]
                            logprobs = completion_logprobs(server.tok, new, offsets[i], req.logprobs > 0)
                            reported[i] += len(new)
                            offsets[i] += sum(len(t) for t in logprobs["tokens"])
                        choice = {"index": i, "text": piece, "logprobs": logprobs, "finish_reason": finish}
                        yield _sse(head | {"choices": [choice]} | extra)
                if extra:
                    yield _sse(head | {"choices": [], "usage": _usage(jobs, texts, req.n)})
                yield "data: [DONE]\n\n"

            return StreamingResponse(_guard(stream()), media_type="text/event-stream")

        finishes = {i: finish async for i, _, finish in server.pieces(jobs, texts, echoed) if finish}
        choices = []
        for i, text in enumerate(texts):
            logprobs = None
            if req.logprobs is not None:
                start = 0 if req.echo else len(server.tok.decode(jobs[i].prompt))
                logprobs = completion_logprobs(server.tok, echoed[i] + text.tokens, start, req.logprobs > 0)
            full = prompt_text(i) + text.text
            choices.append({"index": i, "text": full, "logprobs": logprobs, "finish_reason": finishes[i]})
        return head | {"choices": choices, "usage": _usage(jobs, texts, req.n)}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(req: ChatRequest) -> dict[str, object] | StreamingResponse:
        (prompt,) = await _encode(server.encoder, [req.prompt_text()])
        if not prompt:
            raise ApiError(400, "messages hold no text; give at least one non-empty message")
        requested = req.max_completion_tokens or req.max_tokens
        max_tokens = server.max_tokens([prompt], requested)
        top = (req.top_logprobs or 0) if req.logprobs else None
        jobs = server.jobs(req, [prompt], max_tokens, logprobs=top)
        texts = [ChoiceText(server.tok, req.stops(), server.stop) for _ in jobs]
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time())}
        head["model"] = name

        if req.stream:

            async def stream() -> AsyncIterator[str]:
                chunk = head | {"object": "chat.completion.chunk"}
                extra = {"usage": None} if req.include_usage() else {}
                reported = [0] * len(jobs)
                for i in range(len(jobs)):
                    delta = {"role": "assistant", "content": ""}
                    choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": None}
                    yield _sse(chunk | {"choices": [choice]} | extra)
                async for i, piece, finish in server.pieces(jobs, texts):
                    if piece or finish:
                        logprobs = None
                        if req.logprobs:
                            logprobs = chat_logprobs(server.tok, texts[i].tokens[reported[i] :])
                            reported[i] = len(texts[i].tokens)
                        delta = {"content": piece} if piece else {}
                        choice = {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
                        yield _sse(chunk | {"choices": [choice]} | extra)
                if extra:
                    yield _sse(chunk | {"choices": [], "usage": _usage(jobs, texts, req.n)})
                yield "data: [DONE]\n\n"

            return StreamingResponse(_guard(stream()), media_type="text/event-stream")

        finishes = {i: finish async for i, _, finish in server.pieces(jobs, texts) if finish}
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": text.text},
                "logprobs": chat_logprobs(server.tok, text.tokens) if req.logprobs else None,
                "finish_reason": finishes[i],
            }
            for i, text in enumerate(texts)
        ]
        return head | {"choices": choices, "usage": _usage(jobs, texts, req.n)}

    return app


async def _guard(body: AsyncIterator[str]) -> AsyncIterator[str]:
    """A stream that fails after its headers went out ends with an error event instead of a cut connection."""
    try:
        async for chunk in body:
            yield chunk
    except ApiError as err:
        yield _sse(error_body(err.message, "server_error" if err.status >= 500 else "invalid_request_error"))


def _usage(jobs: list[Job], texts: list[ChoiceText], n: int) -> dict[str, int]:
    prompt = sum(len(j.prompt) for j in jobs[::n])  # n choices share each prompt
    completion = sum(len(t.tokens) for t in texts)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def serve(
    run_dir: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str = "auto",
    checkpoint: str | None = None,
    name: str | None = None,
    max_batch: int = 16,
    cuda_graph: bool = False,
    compile: bool = False,
    max_body_mb: float = 2.0,
) -> None:
    """Load the run and serve it until interrupted."""
    import uvicorn

    from moemla.device import resolve_device
    from moemla.runs import RunFolder

    run = RunFolder.open(run_dir)
    model, tok = run.load_model(resolve_device(device), checkpoint), run.tokenizer()
    mode = "cuda-graph" if cuda_graph else "eager"
    engine = Engine(model, eot_id(tok), max_batch=max_batch, mode=mode, compile=compile)
    app = create_app(engine, tok, name or Path(run_dir).resolve().name, max_body_mb)
    try:
        uvicorn.run(app, host=host, port=port, log_level="info")
    finally:
        engine.close()
