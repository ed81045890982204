"""moemla serve: OpenAI-compatible answers equal to moemla's own decoding; batching, streaming, disconnects, 4xx."""

import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from moemla.inference.generate import generate_ids
from moemla.inference.sampling import greedy

from .conftest import free_port, load_run, make_run, serving_cli

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

NAME = "tiny-moe"


@pytest.fixture(scope="module")
def run(trained_debug_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(trained_debug_run, tmp_path_factory.mktemp("serve") / NAME, "moe-mla-rope", seed=3)


@pytest.fixture(scope="module")
def server(run: Path) -> Iterator[tuple[str, object]]:
    """The app in this process (so tests can read the engine's counters), on a loopback port."""
    from moemla.serve.app import create_app
    from moemla.serve.engine import Engine

    model, tok, _ = load_run(run)
    engine = Engine(model, tok.token_to_id("<|endoftext|>"), max_batch=16, window_s=0.05)
    app = create_app(engine, tok, NAME)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    yield url, engine
    srv.should_exit = True
    thread.join(timeout=10)
    engine.close()


def _post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=60)


def test_models_lists_the_run(server: tuple[str, object]) -> None:
    url, _ = server
    data = httpx.get(url + "/v1/models").json()
    assert data["object"] == "list" and data["data"][0]["id"] == NAME


def test_greedy_completion_equals_moemla_generate(server: tuple[str, object], run: Path) -> None:
    url, _ = server
    prompt = [5, 9, 23, 40, 7]
    r = _post(url, "/v1/completions", {"model": NAME, "prompt": prompt, "max_tokens": 12, "temperature": 0})
    assert r.status_code == 200
    choice = r.json()["choices"][0]
    model, tok, _ = load_run(run)
    want = generate_ids(model, prompt, greedy(12), stop=tok.token_to_id("<|endoftext|>"))
    want = [t for t in want if t != tok.token_to_id("<|endoftext|>")]
    assert choice["text"] == tok.decode(want)
    assert r.json()["usage"] == {"prompt_tokens": 5, "completion_tokens": len(want), "total_tokens": 5 + len(want)}


def test_echo_logprobs_are_the_models_scores(server: tuple[str, object], run: Path) -> None:
    """What lm-eval's local-completions reads for loglikelihood: echo, max_tokens 0, the prompt's logprobs."""
    url, _ = server
    prompt = [11, 3, 250, 17, 99, 4]
    body = {"model": NAME, "prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 1}
    lp = _post(url, "/v1/completions", body).json()["choices"][0]["logprobs"]
    model, tok, _ = load_run(run)
    with torch.no_grad():
        want = model(torch.tensor([prompt]))[0][0].log_softmax(-1)  # (T, V)
    assert lp["token_logprobs"][0] is None
    got = torch.tensor(lp["token_logprobs"][1:])
    torch.testing.assert_close(got, want[torch.arange(5), torch.tensor(prompt[1:])], atol=1e-4, rtol=0)
    assert lp["tokens"] == [tok.decode([t]) for t in prompt]
    assert all(len(top) == 1 for top in lp["top_logprobs"][1:])


def test_concurrent_clients_share_batches_and_each_gets_its_own_answer(server: tuple[str, object], run: Path) -> None:
    url, engine = server
    prompts = [[5 + i, 9, 23 + 2 * i, 40] for i in range(8)]
    model, tok, _ = load_run(run)
    eot = tok.token_to_id("<|endoftext|>")
    want = [tok.decode([t for t in generate_ids(model, p, greedy(10), stop=eot) if t != eot]) for p in prompts]
    before = engine.stats["largest_batch"]

    def ask(p: list[int]) -> str:
        r = _post(url, "/v1/completions", {"model": NAME, "prompt": p, "max_tokens": 10, "temperature": 0})
        return r.json()["choices"][0]["text"]

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(ask, prompts))
    assert got == want
    assert max(before, engine.stats["largest_batch"]) > 1


def _events(lines: Iterator[str]) -> list[dict]:
    out = []
    for line in lines:
        if line.startswith("data: "):
            out.append(line[6:])
    assert out[-1] == "[DONE]"
    return [json.loads(x) for x in out[:-1]]


def test_streams_join_to_the_unstreamed_text(server: tuple[str, object]) -> None:
    url, _ = server
    body = {"model": NAME, "prompt": "Once upon a time", "max_tokens": 15, "temperature": 0.7, "seed": 4}
    whole = _post(url, "/v1/completions", body).json()["choices"][0]
    with httpx.stream("POST", url + "/v1/completions", json=body | {"stream": True}, timeout=60) as r:
        chunks = _events(r.iter_lines())
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["finish_reason"]

    chat = {"model": NAME, "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 9, "seed": 1}
    whole = _post(url, "/v1/chat/completions", chat).json()["choices"][0]["message"]["content"]
    with httpx.stream("POST", url + "/v1/chat/completions", json=chat | {"stream": True}, timeout=60) as r:
        chunks = _events(r.iter_lines())
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == whole


def test_a_client_leaving_mid_stream_cancels_its_rows(server: tuple[str, object]) -> None:
    url, engine = server
    before = engine.stats["cancelled"]
    body = {"model": NAME, "prompt": [5, 6, 7], "max_tokens": 55, "temperature": 0.9, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        next(r.iter_lines())  # one event, then hang up
    for _ in range(100):
        if engine.stats["cancelled"] > before:
            break
        time.sleep(0.05)
    assert engine.stats["cancelled"] > before
    r = _post(url, "/v1/completions", {"model": NAME, "prompt": "A cat", "max_tokens": 3})
    assert r.status_code == 200


def test_stop_strings_cut_the_text(server: tuple[str, object]) -> None:
    url, _ = server
    body = {"model": NAME, "prompt": [5, 9, 23], "max_tokens": 20, "temperature": 0}
    full = _post(url, "/v1/completions", body).json()["choices"][0]["text"]
    stop = full[3:5]
    cut = _post(url, "/v1/completions", body | {"stop": [stop]}).json()["choices"][0]
    assert cut["text"] == full[: full.index(stop)] and cut["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        ("{not json", 400, "not valid JSON"),
        ({"model": "gpt-4", "prompt": "hi"}, 404, "does not exist"),
        ({"model": NAME, "prompt": [1] * 64}, 400, "context is 64 tokens"),
        ({"model": NAME, "prompt": "hi", "max_tokens": -4}, 400, "max_tokens"),
        ({"model": NAME, "prompt": "hi", "top_p": 0}, 400, "top_p"),
        ({"model": NAME, "prompt": ""}, 400, "empty"),
        ({"model": NAME, "prompt": [5, 100000]}, 400, "token ids"),
        ({"prompt": "hi"}, 400, "model"),
        ({"model": NAME, "messages": []}, 400, "messages"),
    ],
)
def test_bad_requests_get_4xx_json_and_the_server_lives_on(
    server: tuple[str, object], body: object, status: int, says: str
) -> None:
    url, _ = server
    path = "/v1/chat/completions" if isinstance(body, dict) and "messages" in body else "/v1/completions"
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(url + path, content=content, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == status
    assert says in r.json()["error"]["message"]
    assert httpx.get(url + "/health").json()["status"] == "ok"


def test_a_body_over_the_limit_is_413_before_it_is_read(server: tuple[str, object]) -> None:
    url, _ = server
    body = json.dumps({"model": NAME, "prompt": "a" * (3 * 2**20)})  # the server's default limit is 2 MiB
    start = time.perf_counter()
    r = httpx.post(url + "/v1/completions", content=body, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 413 and time.perf_counter() - start < 10
    err = r.json()["error"]
    assert err["code"] == "request_too_large" and "--max-body-mb" in err["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the server counts what arrives
        for _ in range(48):
            yield b"a" * 2**16

    r = httpx.post(url + "/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert httpx.get(url + "/health").json()["status"] == "ok"


def test_a_huge_prompt_is_refused_at_once_and_small_requests_go_on(server: tuple[str, object]) -> None:
    """A prompt too long for any tokenization is refused by its length, never tokenized on the event loop."""
    url, _ = server
    huge = {"model": NAME, "prompt": "a" * (19 * 2**20 // 10), "max_tokens": 2}  # 1.9 MiB, under the body limit
    small = {"model": NAME, "prompt": [5, 9, 23], "max_tokens": 2, "temperature": 0}
    _post(url, "/v1/completions", small)  # warm

    def timed(path: str, body: dict) -> tuple[float, httpx.Response]:
        start = time.perf_counter()
        r = _post(url, path, body)
        return time.perf_counter() - start, r

    chat = {"model": NAME, "messages": [{"role": "user", "content": huge["prompt"]}]}
    with ThreadPoolExecutor(8) as pool:
        big = [pool.submit(timed, "/v1/completions", huge) for _ in range(3)] + [
            pool.submit(timed, "/v1/chat/completions", chat)
        ]
        time.sleep(0.05)
        small_latency = [pool.submit(timed, "/v1/completions", small).result()[0] for _ in range(5)]
    for future in big:
        _, r = future.result()
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert "shorten the prompt" in r.json()["error"]["message"]
    assert max(small_latency) < 2.0, small_latency


def test_openai_client_streams_usage_and_logprobs_and_reads_the_model(server: tuple[str, object]) -> None:
    """What clients rely on beyond the basics, through the official client: stream_options.include_usage,
    logprobs in streamed chunks, GET /v1/models/{id}, and OpenAI's temperature range."""
    openai = pytest.importorskip("openai")
    url, _ = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    assert client.models.retrieve(NAME).id == NAME
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=NAME, prompt="Once", max_tokens=2, temperature=2.5)

    ask = {"model": NAME, "prompt": "Once upon a time", "max_tokens": 8, "seed": 7, "logprobs": 2}
    whole = client.completions.create(**ask)
    chunks = list(client.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    streamed = [c.choices[0] for c in chunks[:-1]]
    assert "".join(c.text for c in streamed) == whole.choices[0].text
    tokens = [t for c in streamed if c.logprobs for t in c.logprobs.tokens]
    logprobs = [lp for c in streamed if c.logprobs for lp in c.logprobs.token_logprobs]
    offsets = [o for c in streamed if c.logprobs for o in c.logprobs.text_offset]
    assert tokens == whole.choices[0].logprobs.tokens and logprobs == whole.choices[0].logprobs.token_logprobs
    assert offsets == whole.choices[0].logprobs.text_offset

    chat = {"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "seed": 2}
    whole = client.chat.completions.create(**chat, logprobs=True, top_logprobs=2)
    chunks = list(
        client.chat.completions.create(
            **chat, logprobs=True, top_logprobs=2, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    content = [t for c in chunks[:-1] if c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert content == whole.choices[0].logprobs.content and len(content) == whole.usage.completion_tokens
    plain = list(client.chat.completions.create(**chat, stream=True))
    assert all(c.usage is None for c in plain)


def test_cli_serves_on_loopback_to_the_openai_client(run: Path) -> None:
    openai = pytest.importorskip("openai")
    with serving_cli(run, "--device", "cpu") as port:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        out = client.completions.create(model=run.name, prompt="Once", max_tokens=4, temperature=0)
        assert out.choices[0].finish_reason in ("stop", "length") and out.usage.prompt_tokens > 0
        chat = client.chat.completions.create(
            model=run.name, messages=[{"role": "user", "content": "Hi"}], max_tokens=3
        )
        assert chat.choices[0].message.role == "assistant"
        host_ip = socket.gethostbyname(socket.gethostname())
        if not host_ip.startswith("127."):  # bound to the loopback address only: unreachable on the others
            with socket.socket() as s:
                assert s.connect_ex((host_ip, port)) != 0


def test_engine_decodes_the_same_with_static_steps(run: Path) -> None:
    """The step a CUDA graph captures (mode static, checkable on a CPU) serves the same tokens as eager."""
    import queue as q

    from moemla.serve.engine import Engine, Finish, Job, Token

    model, tok, _ = load_run(run)
    out = {}
    for mode in ("eager", "static"):
        engine = Engine(model, tok.token_to_id("<|endoftext|>"), window_s=0.2, mode=mode)
        events: q.Queue = q.Queue()
        prompts = [[5, 9, 23], [17, 2, 60, 61, 62], [8]]
        jobs = [Job(p, greedy(12), lambda e, i=i, sink=events: sink.put((i, e))) for i, p in enumerate(prompts)]
        engine.submit(jobs)
        tokens: dict[int, list[int]] = {0: [], 1: [], 2: []}
        done = 0
        while done < len(jobs):
            i, event = events.get(timeout=60)
            if isinstance(event, Token):
                tokens[i].append(event.id)
            elif isinstance(event, Finish):
                done += 1
        engine.close()
        out[mode] = tokens
    assert out["static"] == out["eager"] and all(out["eager"].values())


def test_an_out_of_range_seed_fails_its_own_request_alone(server: tuple[str, object]) -> None:
    """A seed >= 2^64 once failed every request batched with it (HTTP 500): SamplingConfig refuses it as the request
    becomes its settings, a 400 naming the field, while requests sent with it succeed."""
    url, _ = server
    ok = {"model": NAME, "prompt": "Once upon a time", "max_tokens": 4, "seed": 7}
    with ThreadPoolExecutor(4) as pool:
        rs = [pool.submit(_post, url, "/v1/completions", {**ok, "seed": s}) for s in (2**64, 1, -1, 2)]
        codes = [f.result() for f in rs]
    assert [r.status_code for r in codes] == [400, 200, 400, 200]
    assert codes[0].json()["error"]["message"].startswith("seed must be in")


def test_a_row_that_raises_fails_its_own_request_and_not_its_batch_mates(run: Path) -> None:
    """A batch whose prefill raises for one row runs its other rows again alone: they finish with their tokens, the
    bad row alone gets the error."""
    import queue as q

    from moemla.serve.engine import Engine, Finish, Job, Token

    model, _, _ = load_run(run)
    engine = Engine(model, None, window_s=0.3)
    prefill = engine.decoder.prefill

    def fragile(prompts, *args):  # a row no engine can run: prompt token 13 at the front
        if any(p[0] == 13 for p in prompts):
            raise RuntimeError("this row cannot run")
        return prefill(prompts, *args)

    engine.decoder.prefill = fragile
    events: q.Queue = q.Queue()
    prompts = [[5, 9, 23], [13, 2], [8, 1]]
    jobs = [Job(p, greedy(4), lambda e, i=i, sink=events: sink.put((i, e))) for i, p in enumerate(prompts)]
    engine.submit(jobs)
    got: dict[int, list] = {0: [], 1: [], 2: []}
    done = 0
    while done < 3:
        i, event = events.get(timeout=60)
        got[i].append(event)
        done += isinstance(event, Finish)
    engine.close()
    assert [e.reason for e in got[1]] == ["error"] and "cannot run" in got[1][0].error
    for i in (0, 2):
        assert [type(e) for e in got[i]] == [Token] * 4 + [Finish] and got[i][-1].reason == "length"


def test_batches_take_one_row_of_each_waiting_request_in_turn(run: Path) -> None:
    """A request of many rows sent first, then a one-row request: the small one runs in the first batch that starts
    after it arrives, not after every row of the large one (once: 11.3 s behind a 3,200-row request)."""
    import queue as q
    from collections import deque

    from moemla.serve.engine import Engine, Finish, Job

    model, _, _ = load_run(run)
    engine = Engine(model, None, max_batch=4, window_s=0.2)
    batches: list[list[str]] = []
    real = engine._run

    def recorded(jobs: list) -> None:
        batches.append([j.name for j in jobs])
        real(jobs)

    engine._run = recorded
    done: q.Queue = q.Queue()

    def job(name: str) -> Job:
        j = Job([5, 9, 23], greedy(6), lambda e, n=name: done.put(n) if isinstance(e, Finish) else None)
        j.name = name
        return j

    engine.submit([job(f"big{i}") for i in range(24)])
    engine.submit([job("small")])
    finished = [done.get(timeout=120) for _ in range(25)]
    engine.close()
    assert len(batches) >= 6
    assert any("small" in b for b in batches[:2]), batches
    assert finished.index("small") < 8
    # round robin across waiting requests: a, b, a, b, then a's rest
    engine = Engine(model, None, max_batch=4)
    engine.close()
    engine._waiting = {1: deque("aaaaa"), 2: deque("bb")}
    assert engine._take(4) == ["a", "b", "a", "b"] and engine._take(4) == ["a", "a", "a"]


def test_a_request_over_the_row_limit_is_a_400_naming_the_flag(server: tuple[str, object]) -> None:
    url, _ = server
    r = _post(url, "/v1/completions", {"model": NAME, "prompt": ["Tom"] * 20, "n": 13, "max_tokens": 2})
    assert r.status_code == 400
    assert "260 sequences (20 prompts x n = 13)" in r.json()["error"]["message"]
    assert "--max-rows-per-request" in r.json()["error"]["message"]
    ok = _post(url, "/v1/completions", {"model": NAME, "prompt": ["Tom"] * 16, "n": 16, "max_tokens": 1})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 256


def test_logprobs_20_returns_20_alternatives_even_where_tokens_share_their_text(server: tuple[str, object]) -> None:
    """A byte-level vocabulary has tokens that are parts of one UTF-8 character: decoded alone they all read
    U+FFFD, and a {text: logprob} dict once kept 17-19 of 20. Each token is its own key ("bytes:\\xNN" for those)."""
    url, _ = server
    body = {"model": NAME, "prompt": "Once upon a time", "max_tokens": 8, "logprobs": 20, "temperature": 0}
    tops = _post(url, "/v1/completions", body).json()["choices"][0]["logprobs"]["top_logprobs"]
    assert [len(t) for t in tops] == [20] * len(tops)
    # two or more tokens that decode alone to U+FFFD among one position's 20: the case the old dict lost
    assert any(sum(k.startswith("bytes:\\x") for k in t) >= 2 for t in tops), "no colliding tokens to test"
    chat = {"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "logprobs": True,
            "top_logprobs": 20, "temperature": 0}  # fmt: skip
    content = _post(url, "/v1/chat/completions", chat).json()["choices"][0]["logprobs"]["content"]
    for entry in content:
        assert len(entry["top_logprobs"]) == 20
        assert len({e["token"] for e in entry["top_logprobs"]}) == 20
        assert all(e["bytes"] and "\ufffd" not in e["token"] for e in entry["top_logprobs"])
