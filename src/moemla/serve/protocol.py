"""The OpenAI wire format the server speaks: request bodies, and the text and logprobs of one choice."""

from __future__ import annotations

import json
import time
import uuid

from pydantic import BaseModel, ConfigDict, Field
from tokenizers import Tokenizer

from moemla.data.tokenizer import piece_bytes
from moemla.inference.decode import Token
from moemla.inference.sampling import SamplingConfig


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class Sampling(BaseModel):
    # unknown OpenAI fields (user, presence_penalty, ...) are ignored rather than refused, as most servers do
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=0)
    # moemla's sampling defaults; their checks are SamplingConfig's (`sampling()`), bar OpenAI's temperature cap
    temperature: float = Field(SamplingConfig.temperature, le=2.0)  # 0 is greedy
    top_p: float | None = SamplingConfig.top_p
    top_k: int | None = SamplingConfig.top_k  # not OpenAI's; vLLM and llama.cpp accept it too
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None

    def sampling(self, max_tokens: int, seed: int) -> SamplingConfig:
        """The request's one SamplingConfig (ValueError, naming the field, where a value is out of range)."""
        top_p = None if self.top_p is not None and self.top_p == 1.0 else self.top_p
        return SamplingConfig(self.temperature, self.top_k, top_p, max_tokens, seed)

    def include_usage(self) -> bool:
        """A last chunk with the usage (and no choices) before [DONE], as OpenAI sends it."""
        return self.stream_options is not None and self.stream_options.include_usage

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)  # OpenAI's default for /v1/completions
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | None = ""


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def prompt_text(self) -> str:
        # NOTE: moemla models are base models with no chat template; the conversation is given as plain
        # text, one message per paragraph, and the model continues it
        return "\n\n".join(m.content or "" for m in self.messages)


def error_body(message: str, kind: str = "invalid_request_error", code: str | None = None) -> dict[str, object]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


class ChoiceText:
    """The growing text of one choice: whole characters only, cut at the first stop string."""

    def __init__(self, tokenizer: Tokenizer, stops: list[str], stop_token: int | None) -> None:
        self.tok, self.stops, self.stop_token = tokenizer, stops, stop_token
        self.ids: list[int] = []
        self.text = ""  # decoded so far, whole characters
        self.sent = 0  # characters handed out
        self.tokens: list[Token] = []  # generated tokens (the end-of-text token excluded)
        self.stopped = False  # a stop string was found

    def add(self, token: Token) -> str:
        """Take a generated token; return the text now safe to send (never part of a stop string)."""
        if token.id == self.stop_token or self.stopped:
            return ""
        self.ids.append(token.id)
        self.tokens.append(token)
        text = self.tok.decode(self.ids)
        if not text.endswith("\ufffd"):  # a multi-byte character still incomplete: wait for its other bytes
            self.text = text
        cut = min((i for i in (self.text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = self.text[:cut], True
            return self.flush()
        # hold back what could still become the start of a stop string
        hold = max((len(s) - 1 for s in self.stops), default=0)
        return self._take(max(self.sent, len(self.text) - hold))

    def flush(self) -> str:
        """At the end: everything left, an unfinished multi-byte character included (as U+FFFD)."""
        if not self.stopped:
            self.text = self.tok.decode(self.ids)
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        piece, self.sent = self.text[self.sent : end], max(self.sent, end)
        return piece


def completion_logprobs(tok: Tokenizer, tokens: list[Token], start: int, want_top: bool) -> dict[str, object]:
    """OpenAI's legacy logprobs object; text offsets count from `start` (the prompt's length unless echoed)."""
    strings = [tok.decode([t.id]) for t in tokens]
    offsets, pos = [], start
    for s in strings:
        offsets.append(pos)
        pos += len(s)
    top = [_alternatives(tok, t.top) for t in tokens] if want_top else None
    return {
        "tokens": strings,
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": top,
        "text_offset": offsets,
    }


def token_key(tok: Tokenizer, token_id: int) -> str:
    """A token as a text key: its text, or "bytes:\\xNN..." where the token alone is not whole UTF-8 (as OpenAI
    writes byte tokens), so that distinct tokens get distinct keys."""
    raw = piece_bytes(tok, token_id)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def _alternatives(tok: Tokenizer, top: list[tuple[int, float]]) -> dict[str, float]:
    """The legacy API's {token text: logprob} of a token's top alternatives, one key per token: `logprobs: 20`
    returns 20, also where several are parts of one UTF-8 character (or decode to the same text)."""
    out: dict[str, float] = {}
    for token_id, lp in top:
        key = token_key(tok, token_id)
        out[key if key not in out else f"{key} (token {token_id})"] = lp
    return out


def chat_logprobs(tok: Tokenizer, tokens: list[Token]) -> dict[str, object]:
    """The chat API's logprobs object: per token its text, logprob, bytes and top alternatives."""

    def entry(token_id: int, logprob: float | None) -> dict[str, object]:
        return {"token": token_key(tok, token_id), "logprob": logprob, "bytes": list(piece_bytes(tok, token_id))}

    return {"content": [entry(t.id, t.logprob) | {"top_logprobs": [entry(i, lp) for i, lp in t.top]} for t in tokens]}


def sse(data: dict[str, object]) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(data)}\n\n"


def model_card(name: str, created: int, context: int) -> dict[str, object]:
    return {"id": name, "object": "model", "created": created, "owned_by": "moemla", "max_model_len": context}


def response_head(kind: str, model: str) -> dict[str, object]:
    """id, object, created and model: what every response and chunk of one request shares."""
    prefix = "chatcmpl" if kind.startswith("chat") else "cmpl"
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()), "model": model}


def completion_choice(i: int, text: str, logprobs: dict | None, finish: str | None) -> dict[str, object]:
    return {"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}


def chat_choice(i: int, content: str, logprobs: dict | None, finish: str | None) -> dict[str, object]:
    return {"index": i, "message": {"role": "assistant", "content": content}, "logprobs": logprobs,
            "finish_reason": finish}  # fmt: skip


def chat_delta(i: int, delta: dict[str, str], logprobs: dict | None, finish: str | None) -> dict[str, object]:
    return {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
