"""`moemla web OUT`: serve a web export folder on loopback with the headers multi-threaded WebAssembly needs.

onnxruntime-web runs on several threads only in a cross-origin isolated page (SharedArrayBuffer), which takes two
response headers (COOP same-origin, COEP require-corp); every file the page loads is its own, so they break
nothing. Any other static server shows the page too, on one thread.
"""

from __future__ import annotations

import functools
import http.server
from pathlib import Path
from typing import ClassVar

from moemla.config import ConfigError
from moemla.inference.onnx.engine import read_manifest

ISOLATION = {"Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Embedder-Policy": "require-corp"}
TYPES = {".wasm": "application/wasm", ".mjs": "text/javascript", ".js": "text/javascript"}


def check_web_folder(folder: str | Path) -> dict:
    """The folder's manifest, checked: an ONNX export whose every listed file is there, with the page."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{folder} is not a folder; give the folder `moemla export RUN OUT --format web` wrote")
    manifest = read_manifest(folder)
    if "web" not in manifest:
        raise ConfigError(f"{folder} is an ONNX export without the page; export it with --format web")
    return manifest


class Handler(http.server.SimpleHTTPRequestHandler):
    """Static files of one folder, cross-origin isolated, never cached (a re-export shows at once)."""

    extensions_map: ClassVar[dict[str, str]] = {**http.server.SimpleHTTPRequestHandler.extensions_map, **TYPES}

    def end_headers(self) -> None:
        for name, value in ISOLATION.items():
            self.send_header(name, value)
        self.send_header("Cache-Control", "no-cache")
        super().end_headers()

    def log_message(self, format: str, *args: object) -> None:
        if len(args) > 1 and str(args[1]).startswith(("4", "5")):  # only failed requests: a missing file says why
            super().log_message(format, *args)


def make_server(folder: str | Path, host: str = "127.0.0.1", port: int = 8000) -> http.server.ThreadingHTTPServer:
    """A server for the checked folder, bound (port 0: any free port); serve_forever() serves it."""
    check_web_folder(folder)
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be in 0..65535, got {port}")
    handler = functools.partial(Handler, directory=str(Path(folder).resolve()))
    try:
        return http.server.ThreadingHTTPServer((host, port), handler)
    except OSError as err:
        raise ConfigError(f"cannot listen on {host}:{port} ({err.strerror}); choose another --port") from None


def url(server: http.server.ThreadingHTTPServer) -> str:
    host, port = server.server_address[:2]
    return f"http://{host}:{port}/"
