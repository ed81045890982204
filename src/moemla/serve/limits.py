"""What keeps one request from stalling the others: a body-size limit, and prompt lengths checked off the loop."""

from __future__ import annotations

import asyncio
import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send
from tokenizers import Tokenizer

from moemla.serve.protocol import error_body


class BodyLimit:
    """ASGI middleware: a body over `limit` bytes is answered 413 before it is read whole (or at all, when its
    Content-Length says so), in OpenAI's error shape."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(send)
            return
        seen, refused = 0, False

        async def counted() -> Message:
            nonlocal seen, refused
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit and not refused:  # a chunked body that keeps coming: answer now, and tell
                refused = True  # the app its client has gone, so it drops the request
                await self._refuse(send)
            return {"type": "http.disconnect"} if refused else message

        async def unless_refused(message: Message) -> None:
            if not refused:
                await send(message)

        await self.app(scope, counted, unless_refused)

    async def _refuse(self, send: Send) -> None:
        mb = self.limit / 2**20
        message = f"the request body is over the server's limit of {mb:g} MiB (moemla serve --max-body-mb)"
        body = json.dumps(error_body(message, code="request_too_large")).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def longest_token_chars(tok: Tokenizer) -> int:
    """The most characters one token can stand for (special tokens' text included): a text longer than
    context x this cannot fit the context, whatever it tokenizes to."""
    n = tok.get_vocab_size(with_added_tokens=True)
    return max(len(tok.decode([i], skip_special_tokens=False)) for i in range(n)) or 1


class PromptEncoder:
    """Texts to token ids without blocking the event loop: a text that cannot fit is refused by its length
    alone, the rest is tokenized in a worker thread."""

    def __init__(self, tok: Tokenizer, context: int) -> None:
        self.tok, self.context = tok, context
        self.max_chars = context * longest_token_chars(tok)

    def too_long(self, texts: list[str]) -> str | None:
        """Why the texts cannot fit the context, judged by length alone; None when they may."""
        longest = max((len(t) for t in texts), default=0)
        if longest <= self.max_chars:
            return None
        return (
            f"the prompt has {longest:,} characters, more than the model's context of {self.context} tokens "
            "can hold; shorten the prompt"
        )

    async def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids per text; ValueError when one cannot fit."""
        if (why := self.too_long(texts)) is not None:
            raise ValueError(why)
        return await asyncio.to_thread(lambda: [self.tok.encode(t).ids for t in texts])
