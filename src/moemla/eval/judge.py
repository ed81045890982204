"""An LLM judge for story completions (§4.4, Table 8), over any OpenAI-compatible chat endpoint.

One request per completion scores the paper's four dimensions, each with a written rubric, and asks
for a JSON object. Judgments are appended to a JSONL cache keyed by (prompt, completion, judge
model, rubric version), so a rerun or a run killed halfway never pays for a judgment twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from moemla.config import ConfigError
from moemla.eval.samples import read_jsonl

RUBRIC_VERSION = "moemla-judge-v1"
# The paper's four dimensions (§4.4) with the criteria its prompt template leaves as [SPECIFIC CRITERIA].
RUBRIC = {
    "grammar": (
        "Grammatical Correctness",
        "syntactic accuracy and proper language use: well-formed sentences, agreement, tense, punctuation "
        "and word choice. 10 = no errors; 5 = frequent errors that still leave the meaning clear; "
        "1 = mostly ungrammatical or not language.",
    ),
    "coherence": (
        "Narrative Coherence",
        "logical flow and consistency within the story: it continues the prompt, characters, objects and "
        "places stay consistent, events follow from each other, and it stays on one story. 10 = fully "
        "consistent; 5 = noticeable contradictions or jumps; 1 = unrelated fragments.",
    ),
    "creativity": (
        "Creativity",
        "originality and imaginative content: surprising but fitting events, vivid details, more than a "
        "stock phrase repeated. 10 = fresh and imaginative; 5 = generic but pleasant; 1 = empty or "
        "pure repetition.",
    ),
    "overall": (
        "Overall Quality",
        "a holistic assessment of the completion as a short story for young children. 10 = a story a "
        "careful writer would be glad to publish; 5 = readable but flawed; 1 = unusable.",
    ),
}
DIMENSIONS = tuple(RUBRIC)
SYSTEM = "You are a careful, consistent judge of short stories written for young children. You reply with JSON only."


FIX = (
    "That reply could not be read. Reply with only a JSON object of four integer scores from 1 to 10, e.g. "
    '{"grammar": 7, "coherence": 5, "creativity": 6, "overall": 6}.'
)
REASK_TEMPERATURE = 0.7  # a re-ask at temperature 0 would get the same unreadable reply from a deterministic server


def judge_messages(prompt: str, completion: str) -> list[dict[str, str]]:
    """The request for one completion: the paper's template, for all four dimensions at once."""
    rubric = "\n".join(f"- {key} ({name}): consider {criteria}" for key, (name, criteria) in RUBRIC.items())
    user = (
        "Evaluate the following story completion on a scale of 1-10 for each dimension below. "
        "Be consistent across evaluations and use the full range of scores.\n\n"
        f"{rubric}\n\n"
        f"Story prompt: {prompt}\n"
        f"Completion: {completion}\n\n"
        'Reply with only a JSON object with integer scores, e.g. {"grammar": 7, "coherence": 5, '
        '"creativity": 6, "overall": 6}.'
    )
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def _valid(scores: object) -> dict[str, int] | None:
    if not isinstance(scores, dict):
        return None
    out = {}
    for key in DIMENSIONS:
        value = scores.get(key)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 10:
            return None
        out[key] = value
    return out


def parse_scores(reply: str) -> dict[str, int] | None:
    """The four integer scores of a reply: a JSON object, one wrapped in text or a code fence, or `key: n` lines."""
    with contextlib.suppress(json.JSONDecodeError):
        return _valid(json.loads(reply))
    for block in re.findall(r"\{[^{}]*\}", reply):
        try:
            found = _valid(json.loads(block))
        except json.JSONDecodeError:
            continue
        if found:
            return found
    loose = {}
    for key in DIMENSIONS:  # `"grammar": 8`, `grammar = 8`, `Grammar: 8/10`
        m = re.search(rf'"?{key}"?\s*[:=]\s*(\d+)\b', reply, flags=re.IGNORECASE)
        if m:
            loose[key] = int(m.group(1))
    return _valid(loose)


def judgment_key(prompt: str, completion: str, model: str) -> str:
    return hashlib.sha256(json.dumps([prompt, completion, model, RUBRIC_VERSION]).encode()).hexdigest()


class JudgmentCache:
    """Judgments in a JSONL file, one per line, flushed as each arrives; a line cut short by a kill is skipped."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records = {rec["key"]: rec for rec in read_jsonl(path)}
        self._lock = threading.Lock()

    def add(self, record: dict) -> None:
        with self._lock, self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
            self.records[record["key"]] = record


class JudgeError(RuntimeError):
    """The endpoint cannot be used (unreachable, key refused, model unknown); the message says what to do."""


@dataclass
class Judge:
    """Scores completions through one OpenAI-compatible chat endpoint; safe to call from several threads."""

    endpoint: str
    model: str
    retries: int = 4  # per request, on 429, 5xx, timeouts and lost connections, with exponential backoff
    parse_retries: int = 2  # extra requests when a reply has no four valid scores; then it is recorded unparsed
    timeout: float = 60.0
    backoff: float = 1.0  # seconds before the first retry; doubled each time, with jitter
    requests: int = 0

    def __post_init__(self) -> None:
        try:
            import openai
        except ImportError:
            raise ConfigError("moemla judge needs the openai client: pip install 'moemla[judge]'") from None
        self._openai = openai
        # a local server (vLLM, llama.cpp, Ollama) needs no key; the client wants a non-empty one
        key = os.environ.get("OPENAI_API_KEY") or "no-key"
        self._client = openai.OpenAI(base_url=self.endpoint, api_key=key, max_retries=0, timeout=self.timeout)
        self._lock = threading.Lock()

    def _ask(self, messages: list[dict[str, str]], temperature: float = 0.0, max_tokens: int | None = None) -> str:
        oa = self._openai
        limit = {"max_tokens": max_tokens} if max_tokens is not None else {}
        for attempt in range(self.retries + 1):
            with self._lock:
                self.requests += 1
            try:
                reply = self._client.chat.completions.create(
                    model=self.model, messages=messages, temperature=temperature, **limit
                )
                return reply.choices[0].message.content or ""
            except (oa.AuthenticationError, oa.PermissionDeniedError):
                raise JudgeError(
                    f"{self.endpoint} refused the key: set OPENAI_API_KEY to a key this endpoint accepts"
                ) from None
            except oa.NotFoundError:
                raise JudgeError(
                    f"{self.endpoint} does not know model {self.model!r} (or has no /chat/completions); "
                    f"list its models with GET {self.endpoint}/models and pass one with --model"
                ) from None
            except oa.BadRequestError as err:
                raise JudgeError(f"{self.endpoint} rejected the request: {err.message}") from None
            except (oa.RateLimitError, oa.InternalServerError, oa.APITimeoutError, oa.APIConnectionError) as err:
                if attempt == self.retries:
                    if isinstance(err, oa.APIConnectionError) and not isinstance(err, oa.APITimeoutError):
                        raise JudgeError(
                            f"no endpoint reachable at {self.endpoint} after {self.retries + 1} tries; start the "
                            "server or check --endpoint (the OpenAI-style base URL, e.g. http://127.0.0.1:8000/v1)"
                        ) from None
                    raise JudgeError(f"{self.endpoint} kept failing ({type(err).__name__}) after retries") from None
                time.sleep(self._delay(attempt, err))
            except (oa.APIStatusError, IndexError, AttributeError) as err:  # other statuses, replies without choices
                raise JudgeError(f"{self.endpoint} answered unexpectedly: {err}") from None
        raise AssertionError("unreachable")

    def _delay(self, attempt: int, err: Exception) -> float:
        """Exponential backoff with jitter; a server's Retry-After (seconds) wins when it asks for longer."""
        delay = self.backoff * 2**attempt * (0.5 + random.random() / 2)
        response = getattr(err, "response", None)
        after = response.headers.get("retry-after") if response is not None else None
        try:
            return min(max(delay, float(after)), 60.0) if after else delay
        except ValueError:
            return delay

    def probe(self) -> None:
        """One cheap request before any work: an endpoint that is down, refuses the key or lacks the model
        says so now, not after every completion has been generated."""
        self._ask([{"role": "user", "content": "Reply with OK."}], max_tokens=1)

    def score(self, prompt: str, completion: str) -> dict:
        """One judgment record: scores, or scores None with `unparsed` set and the last reply kept.

        The first request is greedy; a reply without four valid scores is answered with a correction and asked
        again with some randomness, so a deterministic server does not repeat the same unreadable reply."""
        messages = judge_messages(prompt, completion)
        reply = ""
        for attempt in range(self.parse_retries + 1):
            if attempt:
                messages = [*messages[:2], {"role": "assistant", "content": reply}, {"role": "user", "content": FIX}]
            reply = self._ask(messages, temperature=REASK_TEMPERATURE if attempt else 0.0)
            scores = parse_scores(reply)
            if scores is not None:
                return {"scores": scores, "unparsed": False, "attempts": attempt + 1}
        return {"scores": None, "unparsed": True, "attempts": self.parse_retries + 1, "reply": reply[:2000]}


def judge_all(
    judge: Judge,
    items: Iterable[tuple[str, str]],
    cache: JudgmentCache,
    concurrency: int = 4,
    on_done: Callable[[], None] | None = None,
) -> list[dict]:
    """The judgment of every (prompt, completion), cached ones first; at most `concurrency` requests at once."""
    items = list(items)
    keys = [judgment_key(p, c, judge.model) for p, c in items]
    todo = {k: item for k, item in zip(keys, items, strict=True) if k not in cache.records}

    def one(key: str, prompt: str, completion: str) -> None:
        result = judge.score(prompt, completion)
        cache.add({"key": key, "model": judge.model, "rubric": RUBRIC_VERSION, "prompt": prompt,
                   "completion": completion, **result})  # fmt: skip
        if on_done is not None:
            on_done()

    if todo:
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            futures = [pool.submit(one, k, p, c) for k, (p, c) in todo.items()]
            done, pending = wait(futures, return_when=FIRST_EXCEPTION)
            for f in pending:  # a fatal error stops the queue; what was judged stays cached
                f.cancel()
            for f in done:
                f.result()
    return [cache.records[k] for k in keys]
