"""The folders moemla writes, told apart by their own record files, and the one rule for writing one.

Torch-free (the ONNX engine and the shipped runner's side of the project import it). Every command that writes
a folder (export in each format, import, prepare, train, reproduce) asks `check_destination` first and, where it
replaces a folder, assembles the new one beside it and swaps it in with `replace_folder`:

- a new or empty folder may always be written;
- `--overwrite` only ever replaces a folder that the same command wrote, recognised by its record (an export's
  manifest, a prepared data set's manifest, a Hugging Face export's config.json), holding nothing but the files
  that record lists;
- never a folder that is, contains or lies inside a run or a prepared data set (the command's own kind aside), or
  the command's source (the run being exported, the folder being imported, the files being prepared).

So no `--overwrite` can delete a run, a prepared data set or a file the user put there.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

RUN_FILE = "run.json"  # a run: model config, training settings, data (runs/folder.py)
METRICS_FILE = "metrics.jsonl"
TOKENIZER_FILE = "tokenizer.json"  # the tokenizer of a run, a prepared data set and every export
MANIFEST = "manifest.json"  # a prepared data set's record (data/shards.py) and an ONNX/web export's (inference/onnx)
HF_CONFIG = "config.json"  # a Hugging Face export's record: moemla_config, and moemla_files since this rule
RESULTS_FILE = "results.json"  # `moemla reproduce`'s results
ONNX_FORMAT = "moemla-onnx"  # an export manifest's "format"
GGUF_FORMAT = "moemla-gguf"  # a GGUF export folder's manifest
GGUF_FILE, MODELFILE = "model.gguf", "Modelfile"  # a GGUF export's model (llama.cpp) and Ollama's recipe

# what each kind is, in words, and which command writes it
KINDS = {
    "run": "a run",
    "imported": "a run written by `moemla import`",
    "data": "a prepared data set",
    "onnx": "an ONNX export",
    "web": "a web export",
    "hf": "a Hugging Face export",
    "gguf": "a GGUF export",
    "results": "a `moemla reproduce` results folder",
}
WRITES = {  # command -> the kinds of folder it writes (and so may replace)
    "export": ("onnx", "web", "hf", "gguf"),
    "import": ("imported",),
    "prepare": ("data",),
    "train": ("run", "imported"),
    "reproduce": ("results",),
}
PROTECTED = ("run", "imported", "data")  # never replaced, contained or entered by another command


class FolderError(ValueError):
    """A folder a command may not write; the message says why and what to do."""


class RecordError(ValueError):
    """A record file (run.json, a manifest) that is missing, not JSON, or lacks a key; the message names all three."""


def read_json(path: Path) -> dict | None:
    """A JSON object from path, or None where there is no such file or it is not one (kind() must never fail)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def kind(folder: str | Path) -> str | None:
    """Which of moemla's folders `folder` is (a KINDS key), by its record file; None for any other folder."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    if (folder / RUN_FILE).is_file():
        meta = read_json(folder / RUN_FILE) or {}
        return "imported" if "imported_from" in meta and not (folder / METRICS_FILE).exists() else "run"
    manifest = read_json(folder / MANIFEST)
    if manifest is not None and manifest.get("format") == ONNX_FORMAT:
        return "web" if "web" in manifest else "onnx"
    if manifest is not None and manifest.get("format") == GGUF_FORMAT:
        return "gguf"
    if manifest is not None and "splits" in manifest:
        return "data"
    config = read_json(folder / HF_CONFIG)
    if config is not None and "moemla_config" in config:
        return "hf"
    if (folder / RESULTS_FILE).is_file() or (folder / "runs").is_dir():  # runs/: a sweep under way
        return "results"
    return None


def owned_files(folder: Path, what: str) -> set[str] | None:
    """The files (paths below folder) that the record of a folder of kind `what` says its command wrote; None
    where the record does not list them (then the folder is replaced only if the caller says so)."""
    if what in ("onnx", "web", "gguf"):
        return {*(read_json(folder / MANIFEST) or {}).get("files", {}), MANIFEST}
    if what == "data":
        manifest = read_json(folder / MANIFEST) or {}
        shards = {s["file"] for split in manifest.get("splits", {}).values() for s in split.get("shards", [])}
        return shards | {TOKENIZER_FILE, MANIFEST}
    if what == "hf":
        files = (read_json(folder / HF_CONFIG) or {}).get("moemla_files")
        return {*files, HF_CONFIG} if isinstance(files, list) else None
    if what == "imported":  # run.json, the tokenizer, the one checkpoint at step 0: nothing trained since
        return {f for f in _files(folder) if _imported_file(f)}
    return None


def file_sizes(folder: Path) -> dict[str, int]:
    """Every file of an export folder but the manifest, by its path below the folder: what its manifest lists."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in files}


def check_listed_files(folder: Path, files: dict[str, int], fix: str) -> None:
    """Every file an export's manifest lists (name -> bytes) is present at its recorded size: a truncated or swapped
    file is named before a runtime reads it. RecordError naming the file and `fix` otherwise."""
    for name, size in files.items():
        f = folder / name
        if not f.is_file() or f.stat().st_size != size:
            what = "is missing" if not f.is_file() else f"has {f.stat().st_size:,} bytes, not {size:,}"
            raise RecordError(f"{f} {what}: the export is incomplete or damaged; {fix}")


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir())


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _named(folder: Path, what: str) -> str:
    return f"{folder} is {KINDS[what]}"


def check_destination(
    out: str | Path, command: str, *, sources: tuple[str | Path, ...] = (), overwrite: bool = False,
    fix: str = "choose a new folder",
) -> Path:  # fmt: skip
    """`out` if `command` (a WRITES key) may write it now; FolderError saying why not and what to do otherwise.
    With overwrite, a non-empty out must be a folder this command wrote and holds only the files it wrote."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FolderError(f"{out} is a file; give a folder to write into")
    real = out.resolve()
    for source in sources:  # (a folder inside a source is refused below unless it is this command's own)
        src = Path(source).resolve()
        if real == src or real in src.parents:
            what = "is" if real == src else "contains"
            raise FolderError(f"{out} {what} {source}, which this command reads; {fix} apart from it")
    _check_writable(out)
    if not out.exists() or not any(out.iterdir()):
        return out
    own = kind(out)
    for parent in real.parents:
        if (k := kind(parent)) in PROTECTED and k not in WRITES[command]:
            raise FolderError(f"{out} lies inside {parent}, which is {KINDS[k]}; {fix} outside it")
    if own in PROTECTED and own not in WRITES[command]:
        raise FolderError(f"{_named(out, own)}: `moemla {command}` never writes into one; {fix}")
    mine = command == "reproduce" and own == "results"  # its runs/ are its own
    inner = [] if mine else [p for p in real.rglob("*") if p.is_dir() and kind(p) in PROTECTED]
    if inner:
        raise FolderError(f"{out} contains {inner[0]}, which is {KINDS[kind(inner[0])]}; {fix}")
    if command in ("train", "reproduce"):  # they continue what is there and delete nothing
        if own not in WRITES[command]:
            what = f"{KINDS[own]}, not {KINDS[WRITES[command][0]]}" if own else "a folder of other files"
            raise FolderError(f"{out} is {what}; `moemla {command}` writes only into a new or empty folder or "
                              f"its own; {fix}")  # fmt: skip
        return out
    if not overwrite:
        raise FolderError(f"{out} exists and is not empty; {fix}, or pass --overwrite to replace "
                          f"{KINDS[own] if own in WRITES[command] else 'it'}")  # fmt: skip
    if own not in WRITES[command]:
        what = f"is {KINDS[own]}" if own else "was not written by moemla"
        raise FolderError(f"{out} {what}: --overwrite only replaces a folder that `moemla {command}` wrote; {fix}, "
                          "or remove it yourself")  # fmt: skip
    listed = owned_files(out, own)
    if listed is None:
        raise FolderError(f"{out} has no list of the files `moemla {command}` wrote there (an older moemla wrote "
                          f"it); {fix}, or remove it yourself")  # fmt: skip
    extra = [f for f in _files(out) if f not in listed]
    if extra:
        shown = ", ".join(extra[:3]) + (f" and {len(extra) - 3} more" if len(extra) > 3 else "")
        raise FolderError(f"{out} holds files that `moemla {command}` did not write ({shown}): --overwrite would "
                          f"delete them; move them out or {fix}")  # fmt: skip
    return out


def _imported_file(name: str) -> bool:
    """A file `moemla import` writes: run.json, the tokenizer, the one checkpoint at step 0 (nothing trained)."""
    parts = name.split("/")
    step_0 = len(parts) == 3 and parts[1].startswith("step_") and parts[1][5:].isdigit() and int(parts[1][5:]) == 0
    return name in (RUN_FILE, TOKENIZER_FILE, "checkpoints/latest") or (parts[0] == "checkpoints" and step_0)


def _check_writable(out: Path) -> None:
    """The nearest existing folder at or above out must take new entries (the new folder is assembled beside out,
    so out's parent must be writable too)."""
    probe = out.parent if out.exists() else out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        test = probe / f".moemla-write-test-{os.getpid()}"
        test.mkdir()
        test.rmdir()
    except OSError as err:
        raise FolderError(f"cannot write {out}: {probe} is not writable ({err.strerror}); choose a folder you can "
                          "write") from None  # fmt: skip


def staging(out: Path, what: str = "partial") -> Path:
    """A fresh folder beside out (same filesystem, so the final rename is atomic) to assemble the new one in."""
    tmp = out.with_name(f".{out.name}.{what}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


@contextlib.contextmanager
def assembled(out: Path, what: str, name: str = "new") -> Iterator[Path]:
    """The one way a command writes a whole folder: it writes into the path this yields (beside OUT, not yet
    created); when the block ends without an error that folder replaces OUT whole, and the staging folder is
    removed either way, so an interrupted command leaves what was there before."""
    stage = staging(out, what)
    try:
        yield stage / name
        replace_folder(stage / name, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def replace_folder(new: Path, out: Path) -> None:
    """new renamed to out; an existing out is moved aside first and removed only once new is in place."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        out.rename(old)
    try:
        new.rename(out)
    except BaseException:
        if old.exists() and not out.exists():
            old.rename(out)  # put the old folder back
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` via a fsynced temporary file; on failure (a full disk) nothing is left behind."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


# the record files, each checked in one place: a missing key or a wrong type is one line naming the file, the key
# and the fix (dotted keys reach inside nested objects)
RUN_KEYS = {"model": dict, "train": dict, "data": dict, "data.tokenizer_sha256": str}
DATA_KEYS = {"format": int, "dtype": str, "splits": dict, "splits.train.shards": list, "splits.val.shards": list,
             "tokenizer": dict}  # fmt: skip
EXPORT_KEYS = {"format": str, "version": int, "config": dict, "config.max_seq_len": int, "config.vocab_size": int,
               "cache": list, "files": dict}  # fmt: skip
GGUF_KEYS = {
    "format": str,
    "version": int,
    "architecture": str,
    "type": str,
    "config": dict,
    "config.max_seq_len": int,
    "config.vocab_size": int,
    "kv_cache_bytes_per_token": dict,
    "files": dict,
}
WEB_KEYS = {"web": dict, "web.page": list, "web.libraries": dict}
TYPE_NAMES = {dict: "an object", list: "a list", str: "a string", int: "an integer"}


def read_record(path: Path, keys: dict[str, type], fix: str) -> dict:
    """The JSON object in `path` with every one of `keys` present at its type; RecordError naming the file, the key
    and `fix` otherwise."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise RecordError(f"{path} is missing; {fix}") from None
    except (OSError, ValueError) as err:
        raise RecordError(f"{path} is not valid JSON ({err}); {fix}") from None
    if not isinstance(data, dict):
        raise RecordError(f"{path} holds {type(data).__name__}, not a JSON object; {fix}")
    return check_record(data, path, keys, fix)


def check_record(data: dict, path: Path, keys: dict[str, type], fix: str) -> dict:
    for key, want in keys.items():
        value: object = data
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is None:
            raise RecordError(f"{path} has no {key!r}; {fix}")
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise RecordError(f"{path}: {key!r} is {type(value).__name__}, not {TYPE_NAMES[want]}; {fix}")
    return data
