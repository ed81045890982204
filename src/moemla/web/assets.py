"""The page's JavaScript libraries: the exact npm tarballs page/package-lock.json pins, fetched once from the npm
registry, checked against the lock file's sha512 and cached, so an export folder carries every file the page loads
and the repository carries none of them (onnxruntime-web's WebAssembly alone is 15 MB).

Offline machines: run `npm ci` in page/ (or anywhere with the same package-lock.json) and pass its node_modules
folder (`--web-assets`, or MOEMLA_WEB_ASSETS); its versions must be the pinned ones.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

from moemla.config import ConfigError

PAGE = Path(__file__).resolve().parent / "page"
LOCK = PAGE / "package-lock.json"
REGISTRY = "https://registry.npmjs.org"
# package -> the files of it the page loads (paths inside the package; package.json names its license); they go to
# vendor/<package>/<file name>.
# ort.wasm.min.mjs is onnxruntime-web's WebAssembly-only build; it loads the SIMD+threads module beside it.
FILES = {
    "onnxruntime-web": [
        "dist/ort.wasm.min.mjs", "dist/ort-wasm-simd-threaded.mjs", "dist/ort-wasm-simd-threaded.wasm", "package.json",
    ],
    "@huggingface/tokenizers": ["dist/tokenizers.min.mjs", "package.json"],
}  # fmt: skip


def pinned() -> dict[str, dict[str, str]]:
    """package -> {"version", "integrity"} for each package the page loads, from the lock file."""
    packages = json.loads(LOCK.read_text())["packages"]
    return {name: packages[f"node_modules/{name}"] for name in FILES}


def cache_root() -> Path:
    base = os.environ.get("MOEMLA_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moemla"
    return Path(base) / "npm"


def tarball_url(name: str, version: str) -> str:
    registry = (os.environ.get("NPM_CONFIG_REGISTRY") or REGISTRY).rstrip("/")
    return f"{registry}/{name}/-/{name.split('/')[-1]}-{version}.tgz"


def check_integrity(data: bytes, integrity: str, what: str) -> None:
    """The lock file's Subresource-Integrity string (sha512-<base64>) must match data."""
    algo, _, want = integrity.partition("-")
    got = base64.b64encode(hashlib.new(algo, data).digest()).decode()
    if got != want:
        raise ConfigError(f"{what} does not match package-lock.json's {algo} checksum; refusing to use it")


def _download(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=120) as response:
        return response.read()


MARKER = ".complete"  # written last into a cached package: its integrity and each extracted file's sha512


def file_digest(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def cached_files(folder: Path, integrity: str) -> dict[str, str] | None:
    """The recorded digests of a cached package whose every file still matches them; None where the marker is
    missing, from another version or older layout, or any file is missing or changed (then it is fetched again)."""
    try:
        marker = json.loads((folder / MARKER).read_text())
        files = marker["files"]
        if marker["integrity"] != integrity:
            return None
        ok = all(file_digest((folder / name).read_bytes()) == digest for name, digest in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return files if ok else None


def fetch(name: str, version: str, integrity: str, cache: Path) -> tuple[Path, dict[str, str]]:
    """The package's page files in the cache and their sha512 digests; downloaded (and the tarball checked against
    the lock file) the first time, and again whenever a cached file no longer matches its digest."""
    folder = cache / f"{name.replace('/', '+')}@{version}"
    digests = cached_files(folder, integrity)
    if digests is not None:
        return folder, digests
    url = tarball_url(name, version)
    try:
        data = _download(url)
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        again = " (its cached copy is damaged)" if folder.exists() else ""
        raise ConfigError(
            f"cannot fetch {name} {version}{again} from {url} ({reason}); connect to the npm registry once (the files "
            f"are then cached in {cache}), or run `npm ci` in {PAGE} and pass --web-assets {PAGE / 'node_modules'}"
        ) from None
    check_integrity(data, integrity, url)
    tmp = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    digests = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for path in FILES[name]:
            member = tar.extractfile(f"package/{path}")
            if member is None:
                raise ConfigError(f"{url} has no {path}; the page needs it")
            content = member.read()
            (tmp / Path(path).name).write_bytes(content)
            digests[Path(path).name] = file_digest(content)
    (tmp / MARKER).write_text(json.dumps({"integrity": integrity, "files": digests}, indent=1) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder, digests


def from_node_modules(root: Path, name: str, version: str) -> Path:
    """The package's page files in an `npm ci` folder, checked to be the pinned version."""
    package = root / name
    try:
        found = json.loads((package / "package.json").read_text())["version"]
    except (OSError, ValueError, KeyError):
        raise ConfigError(f"{root} has no {name}: run `npm ci` in {PAGE} and pass its node_modules folder") from None
    if found != version:
        raise ConfigError(f"{package} is version {found}; the page is pinned to {version} (run `npm ci` in {PAGE})")
    return package


Assets = dict[str, tuple[Path, list[str], str, dict[str, str] | None]]


def resolve_assets(node_modules: str | Path | None = None) -> Assets:
    """package -> (folder holding its page files, their paths in that folder, version, their sha512 digests or None
    for an `npm ci` folder, which npm checked): from an `npm ci` folder (node_modules, or MOEMLA_WEB_ASSETS) or else
    from the cache, fetched from the npm registry the first time and whenever a cached file is damaged."""
    node_modules = node_modules or os.environ.get("MOEMLA_WEB_ASSETS")
    found: Assets = {}
    for name, pin in pinned().items():
        digests = None
        if node_modules:
            src, files = from_node_modules(Path(node_modules), name, pin["version"]), FILES[name]
        else:
            src, digests = fetch(name, pin["version"], pin["integrity"], cache_root())
            files = [Path(f).name for f in FILES[name]]
        for f in files:
            if not (src / f).is_file():
                raise ConfigError(f"{src / f} is missing; the page needs it (run `npm ci` in {PAGE} again)")
        found[name] = (src, files, pin["version"], digests)
    return found


def copy_assets(found: Assets, out: Path) -> dict[str, str]:
    """Copy the resolved library files into out/vendor/<package's last name>/, each checked against its sha512 as
    it is copied (a cached file damaged since it was resolved stops the export); returns package -> version."""
    for name, (src, files, _, digests) in found.items():
        dst = out / "vendor" / name.split("/")[-1]
        dst.mkdir(parents=True, exist_ok=True)
        for f in files:
            data = (src / f).read_bytes()
            if digests is not None and file_digest(data) != digests.get(Path(f).name):
                raise ConfigError(f"{src / f} changed in the cache since it was checked; export again (the "
                                  "damaged copy is then fetched anew)")  # fmt: skip
            (dst / Path(f).name).write_bytes(data)
    return {name: version for name, (_, _, version, _) in found.items()}
