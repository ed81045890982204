"""`moemla web OUT`: serve a web export folder on loopback with the headers multi-threaded WebAssembly needs.

onnxruntime-web runs on several threads only in a cross-origin isolated page (SharedArrayBuffer), which takes two
response headers (COOP same-origin, COEP require-corp); every file the page loads is its own, so they break
nothing. Any other static server shows the page too, on one thread.
"""

from __future__ import annotations

import errno
import functools
import http.server
import os
import socket
import urllib.parse
from pathlib import Path
from typing import ClassVar

from moemla.config import ConfigError
from moemla.folders import MANIFEST, RUN_FILE, WEB_KEYS, RecordError, check_record
from moemla.inference.onnx.engine import read_manifest

ISOLATION = {"Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Embedder-Policy": "require-corp"}
TYPES = {".wasm": "application/wasm", ".mjs": "text/javascript", ".js": "text/javascript"}


def check_web_folder(folder: str | Path) -> dict:
    """The folder's manifest, checked: an ONNX export whose every listed file is there, with the page."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{folder} is not a folder; give the folder `moemla export RUN OUT --format web` wrote")
    if (folder / RUN_FILE).is_file():
        raise ConfigError(f"{folder} is a run, not a web export; write one with `moemla export {folder} OUT --format "
                          "web`, then `moemla web OUT`")  # fmt: skip
    if not (folder / MANIFEST).is_file():
        raise ConfigError(f"{folder} has no {MANIFEST}: it is not a web export; write one with `moemla export RUN "
                          f"{folder} --format web`")  # fmt: skip
    manifest = read_manifest(folder)
    if "web" not in manifest:
        raise ConfigError(f"{folder} is an ONNX export without the page; export it with --format web")
    try:
        return check_record(manifest, folder / MANIFEST, WEB_KEYS, "export it again with `moemla export RUN OUT "
                            "--format web`")  # fmt: skip
    except RecordError as err:
        raise ConfigError(str(err)) from None


class Handler(http.server.SimpleHTTPRequestHandler):
    """Static files of one folder, cross-origin isolated, never cached (a re-export shows at once)."""

    extensions_map: ClassVar[dict[str, str]] = {**http.server.SimpleHTTPRequestHandler.extensions_map, **TYPES}

    def end_headers(self) -> None:
        for name, value in ISOLATION.items():
            self.send_header(name, value)
        self.send_header("Cache-Control", "no-cache")
        super().end_headers()

    def send_head(self) -> object:
        """Only files of the folder: a request that maps to no file in it (a NUL byte, an encoded or a backslash
        separator, a folder other than the page's own) gets a 4xx and the server keeps serving."""
        raw = urllib.parse.urlsplit(self.path).path
        path = urllib.parse.unquote(raw)
        if "\x00" in path or "\\" in path or any(sep in raw.lower() for sep in ("%2f", "%5c")):
            self.send_error(400, "bad path: not a file of this folder")
            return None
        if path != "/" and os.path.isdir(self.translate_path(raw)):
            self.send_error(404, "no listing of folders")
            return None
        return super().send_head()

    def log_message(self, format: str, *args: object) -> None:
        if len(args) > 1 and str(args[1]).startswith(("4", "5")):  # only failed requests: a missing file says why
            super().log_message(format, *args)


def make_server(folder: str | Path, host: str = "127.0.0.1", port: int = 8000) -> http.server.ThreadingHTTPServer:
    """A server for the checked folder, bound (port 0: any free port); serve_forever() serves it."""
    check_web_folder(folder)
    handler = functools.partial(Handler, directory=str(Path(folder).resolve()))
    try:
        return http.server.ThreadingHTTPServer((host, port), handler)
    except OverflowError:  # a port outside 0..65535 (the CLI's port_number refuses it first)
        raise ConfigError(f"--port must be in 0..65535 (0: any free port), got {port}") from None
    except socket.gaierror:
        raise ConfigError(f"--host {host} is not a name or address this machine knows; use 127.0.0.1") from None
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            raise ConfigError(f"cannot listen on {host}:{port}: the port is in use; choose another --port") from None
        raise ConfigError(f"cannot listen on {host}:{port} ({err.strerror}); check --host (an address of this "
                          "machine, e.g. 127.0.0.1) and --port") from None  # fmt: skip


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def network_notice(host: str) -> str | None:
    """The line `moemla web` prints when the page is reachable from other machines (None on loopback)."""
    if host in LOOPBACK:
        return None
    return (f"moemla web: listening on {host}: every file of the folder (the model too) is now reachable from the "
            "network; use --host 127.0.0.1 to keep it on this machine")  # fmt: skip


def url(server: http.server.ThreadingHTTPServer) -> str:
    host, port = server.server_address[:2]
    return f"http://{host}:{port}/"
