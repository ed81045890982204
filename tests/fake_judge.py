"""A small OpenAI-compatible judge on loopback for tests: it scores deterministically and can misbehave on cue."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODEL = "fake-judge"


def expected_scores(completion: str) -> dict[str, int]:
    """What the fake judge gives a completion: a fixed function of its text."""
    h = hashlib.sha256(completion.encode()).digest()
    return {k: 1 + h[i] % 10 for i, k in enumerate(("grammar", "coherence", "creativity", "overall"))}


class FakeJudge:
    """`script` lists what the first requests get: ok, 429, 500, garbage, wrapped, slow; then every request is ok."""

    def __init__(self, script: list[str] | None = None, delay: float = 0.0, key: str | None = None) -> None:
        self.script = list(script or [])
        self.delay, self.key = delay, key
        self.requests = 0
        self.bodies: list[dict] = []  # every judging request as received
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeJudge:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _next(self) -> str:
        with self.lock:
            self.requests += 1
            return self.script.pop(0) if self.script else "ok"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _send(self, status: int, body: object, headers: dict[str, str] | None = None) -> None:
                data = (body if isinstance(body, str) else json.dumps(body)).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def _error(self, status: int, message: str, kind: str) -> None:
                self._send(status, {"error": {"message": message, "type": kind, "code": None}})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if judge.key is not None and self.headers.get("Authorization") != f"Bearer {judge.key}":
                    return self._error(401, "Incorrect API key provided", "invalid_request_error")
                if body.get("model") != MODEL:
                    return self._error(404, f"The model `{body.get('model')}` does not exist", "invalid_request_error")
                judging = [m["content"] for m in body["messages"] if "Completion: " in m["content"]]
                if not judging:  # the judge's probe: answered, and not part of the script
                    return self._reply("OK")
                judge.bodies.append(body)
                action = judge._next()
                if action == "429":
                    return self._send(429, {"error": {"message": "slow down"}}, {"retry-after": "0"})
                if action == "500":
                    return self._error(500, "internal error", "server_error")
                if judge.delay or action == "slow":
                    time.sleep(judge.delay or 0.5)
                text = judging[0]
                completion = text.split("Completion: ", 1)[1].rsplit("\n\nReply with only", 1)[0]
                scores = expected_scores(completion)
                content = {
                    "garbage": "I cannot rate this story.",
                    "wrapped": f"Here are my scores:\n```json\n{json.dumps(scores)}\n```\nThanks!",
                }.get(action, json.dumps(scores))
                self._reply(content)

            def _reply(self, content: str) -> None:
                message = {"role": "assistant", "content": content}
                self._send(
                    200,
                    {
                        "id": f"chatcmpl-{judge.requests}",
                        "object": "chat.completion",
                        "created": 0,
                        "model": MODEL,
                        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                    },
                )

        return Handler
