"""`moemla serve`: an OpenAI-compatible HTTP server (FastAPI) over the batching engine.

/v1/models, /v1/completions (logprobs, echo: what lm-eval's local-completions reads) and /v1/chat/completions,
each streaming as server-sent events on request. Bad requests get OpenAI-style 4xx JSON errors. The routes are
module-level; the app built by `create_app` carries its Server in `app.state.server`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException
from tokenizers import Tokenizer

from moemla.data.tokenizer import eot_id
from moemla.inference.decode import Token
from moemla.inference.llamacpp.engine import is_gguf_folder
from moemla.inference.onnx.engine import is_onnx_folder
from moemla.serve.engine import Engine, Job
from moemla.serve.limits import BodyLimit
from moemla.serve.protocol import (
    ChatRequest,
    ChoiceText,
    CompletionRequest,
    chat_choice,
    chat_delta,
    chat_logprobs,
    completion_choice,
    completion_logprobs,
    error_body,
    model_card,
    response_head,
    sse,
)
from moemla.serve.server import MAX_ROWS, ApiError, Server, encode_prompts, encode_texts, usage

router = APIRouter()


def _server(request: Request) -> Server:
    return request.app.state.server


@router.get("/health")
async def health(request: Request) -> dict[str, object]:
    server = _server(request)
    return {"status": "ok", "model": server.name, **server.engine.stats}


@router.get("/v1/models")
async def models(request: Request) -> dict[str, object]:
    server = _server(request)
    return {"object": "list", "data": [model_card(server.name, server.created, server.engine.context)]}


@router.get("/v1/models/{model:path}")
async def model(model: str, request: Request) -> dict[str, object]:
    server = _server(request)
    if model != server.name:
        raise ApiError(404, f"model {model!r} does not exist; this server serves {server.name!r}", "model_not_found")
    return model_card(server.name, server.created, server.engine.context)


@router.post("/v1/completions", response_model=None)
async def completions(req: CompletionRequest, request: Request) -> dict[str, object] | StreamingResponse:
    server = _server(request)
    prompts = await encode_prompts(req, server.encoder, server.engine.cfg.vocab_size)
    max_tokens = server.max_tokens(prompts, req.max_tokens)
    jobs = server.jobs(req, prompts, max_tokens, logprobs=req.logprobs, echo=req.echo)
    texts = [ChoiceText(server.tok, req.stops(), server.stop) for _ in jobs]
    echoed: list[list[Token]] = [[] for _ in jobs]
    head = response_head("text_completion", server.name)
    if req.stream:
        stream = _completion_chunks(server, req, jobs, texts, echoed, head)
        return StreamingResponse(_guard(stream), media_type="text/event-stream")
    finishes = {i: finish async for i, _, finish in server.pieces(jobs, texts, echoed) if finish}
    choices = []
    for i, text in enumerate(texts):
        logprobs = None
        if req.logprobs is not None:
            start = 0 if req.echo else len(server.tok.decode(jobs[i].prompt))
            logprobs = completion_logprobs(server.tok, echoed[i] + text.tokens, start, req.logprobs > 0)
        choices.append(completion_choice(i, _echo(server, req, jobs[i]) + text.text, logprobs, finishes[i]))
    return head | {"choices": choices, "usage": usage(jobs, texts, req.n)}


def _echo(server: Server, req: CompletionRequest, job: Job) -> str:
    return server.tok.decode(job.prompt) if req.echo else ""


async def _completion_chunks(
    server: Server, req: CompletionRequest, jobs: list[Job], texts: list[ChoiceText], echoed: list[list[Token]],
    head: dict[str, object],
) -> AsyncIterator[str]:  # fmt: skip
    """The completion as server-sent events: text (and logprobs) as it is safe to send, usage last on request."""
    sent_prompt = [False] * len(jobs)
    reported = [0] * len(jobs)  # tokens whose logprobs went out, per choice
    offsets = [0 if req.echo else len(server.tok.decode(j.prompt)) for j in jobs]
    extra = {"usage": None} if req.include_usage() else {}
    async for i, piece, finish in server.pieces(jobs, texts, echoed):
        if not sent_prompt[i]:  # an echoed prompt goes out with the choice's first chunk
            piece, sent_prompt[i] = _echo(server, req, jobs[i]) + piece, True
        if not (piece or finish):
            continue
        logprobs = None
        if req.logprobs is not None:
            new = (echoed[i] + texts[i].tokens)[reported[i] :]
            logprobs = completion_logprobs(server.tok, new, offsets[i], req.logprobs > 0)
            reported[i] += len(new)
            offsets[i] += sum(len(t) for t in logprobs["tokens"])
        yield sse(head | {"choices": [completion_choice(i, piece, logprobs, finish)]} | extra)
    if extra:
        yield sse(head | {"choices": [], "usage": usage(jobs, texts, req.n)})
    yield "data: [DONE]\n\n"


@router.post("/v1/chat/completions", response_model=None)
async def chat(req: ChatRequest, request: Request) -> dict[str, object] | StreamingResponse:
    server = _server(request)
    (prompt,) = await encode_texts(server.encoder, [req.prompt_text()])
    if not prompt:
        raise ApiError(400, "messages hold no text; give at least one non-empty message")
    max_tokens = server.max_tokens([prompt], req.max_completion_tokens or req.max_tokens)
    jobs = server.jobs(req, [prompt], max_tokens, logprobs=(req.top_logprobs or 0) if req.logprobs else None)
    texts = [ChoiceText(server.tok, req.stops(), server.stop) for _ in jobs]
    head = response_head("chat.completion", server.name)
    if req.stream:
        stream = _chat_chunks(server, req, jobs, texts, head | {"object": "chat.completion.chunk"})
        return StreamingResponse(_guard(stream), media_type="text/event-stream")
    finishes = {i: finish async for i, _, finish in server.pieces(jobs, texts) if finish}
    choices = [
        chat_choice(i, text.text, chat_logprobs(server.tok, text.tokens) if req.logprobs else None, finishes[i])
        for i, text in enumerate(texts)
    ]
    return head | {"choices": choices, "usage": usage(jobs, texts, req.n)}


async def _chat_chunks(
    server: Server, req: ChatRequest, jobs: list[Job], texts: list[ChoiceText], chunk: dict[str, object]
) -> AsyncIterator[str]:
    """The chat completion as server-sent events: the role first, then content deltas, usage last on request."""
    extra = {"usage": None} if req.include_usage() else {}
    reported = [0] * len(jobs)
    for i in range(len(jobs)):
        yield sse(chunk | {"choices": [chat_delta(i, {"role": "assistant", "content": ""}, None, None)]} | extra)
    async for i, piece, finish in server.pieces(jobs, texts):
        if not (piece or finish):
            continue
        logprobs = None
        if req.logprobs:
            logprobs = chat_logprobs(server.tok, texts[i].tokens[reported[i] :])
            reported[i] = len(texts[i].tokens)
        delta = {"content": piece} if piece else {}
        yield sse(chunk | {"choices": [chat_delta(i, delta, logprobs, finish)]} | extra)
    if extra:
        yield sse(chunk | {"choices": [], "usage": usage(jobs, texts, req.n)})
    yield "data: [DONE]\n\n"


async def _guard(body: AsyncIterator[str]) -> AsyncIterator[str]:
    """A stream that fails after its headers went out ends with an error event instead of a cut connection."""
    try:
        async for chunk in body:
            yield chunk
    except ApiError as err:
        yield sse(error_body(err.message, "server_error" if err.status >= 500 else "invalid_request_error"))


async def _api_error(_: Request, err: ApiError) -> JSONResponse:
    kind = "invalid_request_error" if err.status < 500 else "server_error"
    return JSONResponse(error_body(err.message, kind, err.code), status_code=err.status)


async def _invalid(_: Request, err: RequestValidationError) -> JSONResponse:
    problems = []
    for e in err.errors():
        if e.get("type") == "json_invalid":
            why = (e.get("ctx") or {}).get("error", "")
            return JSONResponse(error_body(f"the request body is not valid JSON ({why})"), status_code=400)
        where = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        problems.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
    return JSONResponse(error_body("invalid request: " + "; ".join(problems)), status_code=400)


async def _http(_: Request, err: HTTPException) -> JSONResponse:
    return JSONResponse(error_body(str(err.detail)), status_code=err.status_code)


def create_app(
    engine: Engine, tokenizer: Tokenizer, name: str, max_body_mb: float = 2.0, max_rows: int = MAX_ROWS
) -> FastAPI:
    app = FastAPI(title="moemla", description=f"OpenAI-compatible server for {name}")
    app.state.server = Server(engine, tokenizer, name, max_rows)
    app.add_middleware(BodyLimit, limit=int(max_body_mb * 2**20))
    app.add_exception_handler(ApiError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _invalid)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, _http)  # type: ignore[arg-type]
    app.include_router(router)
    return app


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
    max_rows: int = MAX_ROWS,
) -> None:
    """Load the run and serve it until interrupted."""
    import uvicorn

    from moemla.inference.load import open_decoder

    # the torch engine for a run folder (batches of any size), the ONNX or llama.cpp engine for an export
    engine_name = "auto" if is_onnx_folder(run_dir) or is_gguf_folder(run_dir) else "torch"
    mode = "cuda-graph" if cuda_graph else "eager"
    decoder, tok = open_decoder(run_dir, engine_name, device=device, checkpoint=checkpoint, batch_size=max_batch,
                                mode=mode, compile=compile)  # fmt: skip
    engine = Engine(decoder, eot_id(tok), max_batch=max_batch)
    app = create_app(engine, tok, name or Path(run_dir).resolve().name, max_body_mb, max_rows)
    try:
        uvicorn.run(app, host=host, port=port, log_level="info")
    finally:
        engine.close()
