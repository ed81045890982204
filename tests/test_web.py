"""The web export: the page runs the exported model in a real headless Chromium and writes the tokens the Python
ONNX engine writes; its JavaScript follows the Python rules (tokenizer, fit check); every file it loads is in the
folder; `moemla web` serves it cross-origin isolated; bad input is one line on the page or the command line."""

import functools
import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from moemla.cli import main
from moemla.config import ConfigError

from .conftest import free_port, make_run

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from moemla.inference.generate import generate_ids
from moemla.inference.onnx.engine import OnnxDecoder
from moemla.inference.sampling import PromptTooLong, fit, greedy
from moemla.web import PAGE_FILES
from moemla.web.assets import LOCK, pinned, resolve_assets
from moemla.web.browser import browser, serving, why_no_browser
from moemla.web.server import make_server

PROMPT = "Once upon a time"
ROOT_SHARED = Path(__file__).resolve().parents[2] / "shared"  # ../shared beside the checkout, where present
NEW = 24


def _assets_or_skip() -> None:
    try:
        resolve_assets()
    except ConfigError as err:  # no registry and no node_modules: nothing to test the page with
        pytest.skip(f"the page's libraries are not available here: {err}")


@pytest.fixture(scope="module")
def web_exports(trained_debug_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`moemla export RUN OUT --format web` (int8, the default) of the trained debug run (moe-mla-rope; one step of
    training repeats one token) and of an mha and a moe-mla-rope run whose weights are far from their init (varied
    greedy continuations: a wrong cache or position shows)."""
    _assets_or_skip()
    root = tmp_path_factory.mktemp("web")
    runs = {"moe-mla-rope": trained_debug_run, "mha": make_run(trained_debug_run, root / "mha-run", "mha"),
            "moe-mla-rope-varied": make_run(trained_debug_run, root / "mla-run", "moe-mla-rope")}  # fmt: skip
    assert json.loads((trained_debug_run / "run.json").read_text())["model"]["attention"] == "mla"
    out = {}
    for variant, run in runs.items():
        out[variant] = root / variant
        assert main(["export", str(run), str(out[variant]), "--format", "web"]) == 0
    return out


@contextmanager
def plain_server(folder: Path) -> Iterator[str]:
    """Any static file server (Python's, without moemla web's headers) serving folder; yields its URL."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def _python_greedy(folder: Path, prompt_ids: list[int], new: int) -> list[int]:
    dec = OnnxDecoder(folder)
    ids = generate_ids(dec, prompt_ids, greedy(new), stop=dec.manifest["eos_token_id"])
    return ids[:-1] if ids and ids[-1] == dec.manifest["eos_token_id"] else ids  # the page does not show eos


@pytest.fixture(scope="module")
def chromium() -> object:
    reason = why_no_browser()
    if reason:
        pytest.skip(reason)
    with browser(page_timeout_s=120) as b:
        yield b


@pytest.mark.parametrize("variant", ["moe-mla-rope", "moe-mla-rope-varied", "mha"])
def test_the_page_writes_the_python_engines_greedy_tokens_in_chromium(
    web_exports: dict, chromium: object, variant: str
) -> None:
    folder = web_exports[variant]
    with serving(str(folder)) as url:
        run = chromium.open(f"{url}?prompt={PROMPT.replace(' ', '%20')}&greedy=1&max={NEW}")
    assert run.state == "done", run.status
    assert run.console_errors == []
    assert run.result["ids"] == _python_greedy(folder, run.result["prompt_ids"], NEW)
    if variant != "moe-mla-rope":
        assert len(set(run.result["ids"])) > 1, "a single repeated token would prove little"
    assert run.story.startswith(PROMPT) and len(run.story) > len(PROMPT)
    assert run.result["threads"] >= 1 and run.result["ttft_ms"] > 0


def test_sampling_in_the_page_is_seeded_and_the_page_works_single_threaded(web_exports: dict, chromium: object) -> None:
    folder = web_exports["mha"]
    with serving(str(folder)) as url:
        a, b = (chromium.open(f"{url}?prompt=Tom&max={NEW}&seed=7") for _ in range(2))
        c = chromium.open(f"{url}?prompt=Tom&max={NEW}&seed=8")
    assert a.state == b.state == c.state == "done"
    assert a.result["ids"] == b.result["ids"] != c.result["ids"]
    with plain_server(folder) as url:  # no isolation headers: one thread, the same greedy tokens
        plain = chromium.open(f"{url}?prompt=Tom&greedy=1&max={NEW}")
    assert plain.state == "done" and plain.result["threads"] == 1
    assert plain.result["ids"] == _python_greedy(folder, plain.result["prompt_ids"], NEW)


def test_bad_input_is_one_line_on_the_page(web_exports: dict, chromium: object, tmp_path: Path) -> None:
    folder = web_exports["mha"]
    context = json.loads((folder / "manifest.json").read_text())["config"]["max_seq_len"]
    with serving(str(folder)) as url:
        long = chromium.open(f"{url}?prompt={'word%20' * (2 * context)}&greedy=1&max=5")
        big = chromium.open(f"{url}?prompt=Tom&max=5&memory_mb=0.01")
    assert long.state == "error" and "shorten the prompt" in long.result["error"]
    assert big.state == "error" and "a browser can load at most" in big.result["error"]
    # a folder missing its model: the page says which file, `moemla web` refuses it first
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / "model.onnx").unlink()
    with pytest.raises(ConfigError, match=r"model\.onnx is missing"):
        make_server(broken, port=0)
    with plain_server(broken) as url:
        missing = chromium.open(f"{url}?prompt=Tom&max=5")
    assert missing.state == "error" and "model.onnx is missing" in missing.result["error"]
    for run in (long, big, missing):
        assert "\n" not in run.result["error"]


def test_a_page_that_cannot_start_says_which_file_and_what_to_do(
    web_exports: dict, chromium: object, tmp_path: Path
) -> None:
    """Issue 45, case 7: a module missing from the folder, or the page opened from file://, is one line on the
    page within seconds (app.js never runs then: index.html's watchdog says it), never "loading" forever."""
    for missing in ("vendor/tokenizers/tokenizers.min.mjs", "generate.js"):
        broken = tmp_path / missing.replace("/", "-")
        shutil.copytree(web_exports["mha"], broken)
        (broken / missing).unlink()
        with plain_server(broken) as url:
            page = chromium.open(f"{url}?prompt=Tom&max=5")
        assert page.state == "error" and missing in page.result["error"], page.result
        assert "--format web" in page.result["error"] and "\n" not in page.result["error"]
    page = chromium.open((web_exports["mha"] / "index.html").as_uri())
    assert page.state == "error" and "moemla web" in page.result["error"], page.result
    with plain_server(web_exports["mha"]) as url:
        bad = chromium.open(f"{url}?prompt=Tom&max=abc")
    assert bad.state == "error" and "max=abc" in bad.result["error"], bad.result


def test_a_damaged_file_in_the_npm_cache_is_fetched_again_or_stops_the_export(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Issue 45, case 8: each cached file is checked against its sha512 whenever it is used and copied."""
    from moemla.web import assets

    _assets_or_skip()
    cache = tmp_path / "cache"
    shutil.copytree(assets.cache_root().parent, cache)
    monkeypatch.setenv("MOEMLA_CACHE", str(cache))
    found = resolve_assets()
    src = found["@huggingface/tokenizers"][0]
    damaged = src / "tokenizers.min.mjs"
    good = damaged.read_bytes()
    damaged.write_bytes(b"export const Tokenizer = null;")  # same cache, wrong bytes
    offline = urllib.error.URLError("no network")
    with monkeypatch.context() as m:
        m.setattr(assets, "_download", lambda url: (_ for _ in ()).throw(offline))
        with pytest.raises(ConfigError, match="cached copy is damaged"):
            resolve_assets()
    try:
        again = resolve_assets()  # online: fetched anew
    except ConfigError as err:
        pytest.skip(f"the npm registry is not reachable here: {err}")
    assert again["@huggingface/tokenizers"][0] / "tokenizers.min.mjs" == damaged and damaged.read_bytes() == good
    damaged.write_bytes(b"changed after the check")  # damaged between resolving and copying: the copy stops
    with pytest.raises(ConfigError, match="changed in the cache"):
        assets.copy_assets(again, tmp_path / "export")


def test_every_file_the_page_loads_is_in_the_folder_and_listed(web_exports: dict) -> None:
    folder = web_exports["moe-mla-rope"]
    manifest = json.loads((folder / "manifest.json").read_text())
    on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(manifest["files"]) == on_disk
    assert manifest["quantize"] == "int8"
    assert manifest["web"]["libraries"] == {name: pin["version"] for name, pin in pinned().items()}
    for name in PAGE_FILES:
        text = (folder / name).read_text()
        assert not re.search(r"https?://|//cdn", text), f"{name} loads something from the network"
        for imported in re.findall(r'from "(\./[^"]+)"|src="([^"]+)"', text):
            path = next(p for p in imported if p)
            assert (folder / path).is_file(), f"{name} loads {path}, which the folder lacks"
    assert (folder / "vendor/onnxruntime-web/ort-wasm-simd-threaded.wasm").stat().st_size > 1_000_000


def test_moemla_web_serves_the_folder_cross_origin_isolated(web_exports: dict) -> None:
    with serving(str(web_exports["mha"])) as base:
        wasm = "vendor/onnxruntime-web/ort-wasm-simd-threaded.wasm"
        for path, kind in [("", "text/html"), (wasm, "application/wasm"), ("app.js", "text/javascript")]:
            with urllib.request.urlopen(base + path) as r:
                assert r.headers["Cross-Origin-Opener-Policy"] == "same-origin"
                assert r.headers["Cross-Origin-Embedder-Policy"] == "require-corp"
                assert r.headers["Content-Type"].startswith(kind)


def test_moemla_web_refuses_bad_folders_and_ports_in_one_line(
    web_exports: dict, trained_debug_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    onnx_only = tmp_path / "onnx"  # an ONNX export: the web folder's manifest without its page
    shutil.copytree(web_exports["mha"], onnx_only)
    manifest = json.loads((onnx_only / "manifest.json").read_text())
    del manifest["web"]
    (onnx_only / "manifest.json").write_text(json.dumps(manifest))
    cases = [
        ([str(onnx_only)], "without the page; export it with --format web"),
        ([str(tmp_path / "nowhere")], "is not a folder"),
        ([str(trained_debug_run)], "is a run, not a web export"),
        ([str(web_exports["mha"]), "--port", "99999"], "--port must be in 0..65535"),
    ]
    for argv, message in cases:
        assert main(["web", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    top_p = make_run(trained_debug_run, tmp_path / "top-p", "moe-mla-rope", routing="top-p")
    assert main(["export", str(top_p), str(tmp_path / "top-p-web"), "--format", "web"]) == 2
    assert "routing='top-p'" in capsys.readouterr().err and not (tmp_path / "top-p-web").exists()
    taken = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", taken))
        s.listen()
        assert main(["web", str(web_exports["mha"]), "--port", str(taken)]) == 2
    assert "choose another --port" in capsys.readouterr().err


def _node(script: str, *args: str) -> str:
    if shutil.which("node") is None:
        if os.environ.get("MOEMLA_REQUIRE_NODE"):  # CI (.ci/run) has node: a parity test that skips there hides a fault
            pytest.fail("node is not installed, and MOEMLA_REQUIRE_NODE says these parity tests must run")
        pytest.skip("node is not installed: the JavaScript is checked in Chromium only")
    return subprocess.run(["node", "--input-type=module", "-e", script, *args], capture_output=True, text=True,
                          check=True).stdout  # fmt: skip


def test_the_pages_tokenizer_equals_the_python_tokenizer(web_exports: dict, tmp_path: Path) -> None:
    """The page's tokenizer (tokenizers.js) encodes and decodes as the Python tokenizer: our trained BPE, and GPT-2's
    (the presets' vocabulary) where ../shared/data holds it."""
    from tokenizers import Tokenizer

    folder = web_exports["mha"]
    texts = ["Once upon a time, there was a little girl named Lily.", "  two  spaces\n\nnew lines\tand a tab ",
             "émoji 😀 ünïcödé 日本語 ﬁ", "don't won't I'll 123 4567 3.14", "a\u00a0b \u2003c",
             "<|endoftext|>Tom", "def f(x):\n    return x ** 2  # a comment\n"]  # fmt: skip
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    script = f"""
import {{ Tokenizer }} from "{(folder / "vendor/tokenizers/tokenizers.min.mjs").as_uri()}";
import fs from "fs";
const tok = new Tokenizer(JSON.parse(fs.readFileSync(process.argv[1])), {{ clean_up_tokenization_spaces: false }});
const texts = JSON.parse(fs.readFileSync(process.argv[2]));
console.log(JSON.stringify(texts.map((t) => {{
  const ids = tok.encode(t, {{ add_special_tokens: false }}).ids;
  return [ids, tok.decode(ids, {{ skip_special_tokens: true }})];
}})));"""
    gpt2 = ROOT_SHARED / "data" / "gpt2" / "tokenizer.json"
    for path in [folder / "tokenizer.json"] + ([gpt2] if gpt2.is_file() else []):
        got = json.loads(_node(script, str(path), str(tmp_path / "texts.json")))
        tok = Tokenizer.from_file(str(path))
        for text, (ids, decoded) in zip(texts, got, strict=True):
            assert ids == tok.encode(text).ids, (path, text)
            assert decoded == tok.decode(ids), (path, text)


PAGE_JS = Path(__file__).resolve().parent.parent / "src" / "moemla" / "web" / "page" / "generate.js"


def test_the_pages_sampler_keeps_the_python_samplers_candidates() -> None:
    """On the same logits the page's sampler (generate.js `candidates`) keeps exactly the tokens moemla's sampler
    keeps (top-k, the top-p nucleus, both, ties) with the same probabilities; a seed repeating is not enough."""
    import torch

    from moemla.inference.sampling import filter_logits

    gen = torch.Generator().manual_seed(0)
    logits = [torch.randn(50, generator=gen) * 3 for _ in range(4)] + [torch.tensor([2.0, 2.0, 1.0, 1.0, 0.0, 2.0])]
    # (on the tied row no equal logits straddle a top-k cut, where topk's choice is its own: _most_likely)
    settings = [(1.0, None, None), (0.7, 5, None), (1.3, None, 0.9), (0.8, 10, 0.5), (1.0, 3, 1.0), (2.0, 3, 0.7)]
    cases = [(row.tolist(), t, k, p) for row in logits for t, k, p in settings]
    script = f"""
import {{ candidates }} from "{PAGE_JS.as_uri()}";
console.log(JSON.stringify({json.dumps(cases)}.map(([logits, temperature, topK, topP]) =>
  candidates(Float32Array.from(logits), {{ temperature, topK, topP }}))));"""
    got = json.loads(_node(script))
    for (row, t, k, p), js in zip(cases, got, strict=True):
        filtered = filter_logits(torch.tensor([row]) / t, k, p)[0]
        want = {i: float(q) for i, q in enumerate(filtered.softmax(-1)) if torch.isfinite(filtered[i])}
        kept = {i: q for i, q in zip(js["order"], js["probs"], strict=True) if q > 0}
        assert kept.keys() == want.keys(), (row, t, k, p)
        assert all(abs(kept[i] - want[i]) < 1e-5 for i in want), (row, t, k, p)


def test_the_page_refuses_the_sampling_settings_python_refuses() -> None:
    from moemla.inference.sampling import SamplingConfig

    cases = [(t, k, p, n, s) for t, k, p, n, s in [
        (0.8, 40, None, 10, 0), (-1, None, None, 10, 0), (float("nan"), None, None, 10, 0), (1, 0, None, 10, 0),
        (1, 2.5, None, 10, 0), (1, None, 0, 10, 0), (1, None, 1.5, 10, 0), (1, None, 1.0, 10, 0),
        (1, None, None, -1, 0), (0, None, None, 0, 2**63), (0, None, None, 0, 2**63 - 1)]]  # fmt: skip
    script = f"""
import {{ checkSampling }} from "{PAGE_JS.as_uri()}";
const cases = {json.dumps([[t if t == t else "nan", k, p, n, str(s)] for t, k, p, n, s in cases])};
console.log(JSON.stringify(cases.map(([temperature, topK, topP, maxNewTokens, seed]) => {{
  try {{
    checkSampling({{ temperature: temperature === "nan" ? NaN : temperature, topK, topP, maxNewTokens,
                    seed: BigInt(seed) }});
    return true;
  }} catch (e) {{ return false; }}
}})));"""
    got = json.loads(_node(script))
    for (t, k, p, n, s), js in zip(cases, got, strict=True):
        try:
            SamplingConfig(temperature=t, top_k=k, top_p=p, max_new_tokens=n, seed=s)
            if isinstance(k, float):  # Python's flag parser refuses a fractional --top-k before SamplingConfig
                raise ValueError
            ok = True
        except ValueError:
            ok = False
        assert js == ok, (t, k, p, n, s)


def test_the_pages_fit_check_is_the_python_one(web_exports: dict) -> None:
    cases = [(p, c, m) for p in (0, 1, 5, 63, 64, 65) for c in (64,) for m in (0, 1, 10, 200)]
    script = f"""
import {{ fit }} from "{(web_exports["mha"] / "generate.js").as_uri()}";
console.log(JSON.stringify({json.dumps(cases)}.map(([p, c, m]) => {{
  try {{ return fit(p, c, m); }} catch (e) {{ return e.message; }}
}})));"""
    got = json.loads(_node(script))
    for (p, c, m), js in zip(cases, got, strict=True):
        try:
            want: object = fit(p, c, m)
        except (PromptTooLong, ValueError) as err:
            want = str(err)
        assert js == want, (p, c, m)


def test_the_lock_file_pins_what_the_page_loads() -> None:
    lock = json.loads(LOCK.read_text())
    for name, pin in pinned().items():
        assert lock["packages"][""]["dependencies"][name] == pin["version"]  # exact pins, no ranges
        assert pin["integrity"].startswith("sha512-")
