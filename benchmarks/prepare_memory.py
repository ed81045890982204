"""Peak memory and time of `moemla prepare` on big inputs: many stories, or one document of the same size.

    python benchmarks/prepare_memory.py --sizes-mb 10,100,1000
    python benchmarks/prepare_memory.py --sizes-mb 10,50 --layouts document --small-docs 40 --pythonpath OLD/src

The shared TinyStories sample (../shared/data, or the built-in corpus where it is absent) is repeated to each size,
once as a .txt of stories separated by blank lines, once as a folder holding a single file (one document, the
whole file: a novel, a log, a generated source file). Each `moemla prepare --vocab-size 4096` runs in its own
process; its peak resident memory comes from wait4 (the process's max RSS). Prints a Markdown table, then one JSON
line. `--small-docs N` adds N small documents beside the big one (an older moemla refused a lone document: one
story), `--pythonpath` runs another checkout's moemla (a before/after on the same machine).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinystories-train-sample.txt"


def sample_text() -> str:
    if SAMPLE.is_file():
        return SAMPLE.read_text()
    from moemla.data.corpus import stories

    return "\n\n".join(stories(0, 2000))


def write_repeated(path: Path, text: str, size: int) -> None:
    """text repeated (blank line between copies) until the file holds `size` bytes."""
    block = (text.strip() + "\n\n").encode()
    with path.open("wb") as f:
        written = 0
        while written < size:
            piece = block[: size - written]
            f.write(piece)
            written += len(piece)


def run(argv: list[str], pythonpath: str | None = None) -> tuple[float, float, int]:
    """(seconds, peak RSS MiB, exit code) of one command in its own process."""
    env = {**os.environ, "PYTHONPATH": pythonpath} if pythonpath else None
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        print(proc.stderr.read().decode()[-2000:], file=sys.stderr)
    return seconds, usage.ru_maxrss / 1024, proc.returncode


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes-mb", default="10,100,1000", help="input sizes in MB (10^6 bytes)")
    p.add_argument("--layouts", default="stories,document", help="stories (a .txt) and/or document (a folder)")
    p.add_argument("--tmp", default=None, help="folder for the inputs and outputs (default: the system's temp)")
    p.add_argument("--small-docs", type=int, default=0, help="small documents beside a document layout's big one")
    p.add_argument("--pythonpath", help="run the moemla of this source folder (e.g. an older checkout's src)")
    args = p.parse_args()
    text = sample_text()
    rows = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for mb in map(int, args.sizes_mb.split(",")):
            for layout in args.layouts.split(","):
                root = Path(tmp) / f"{layout}-{mb}"
                root.mkdir()
                source = root / "input.txt" if layout == "stories" else root / "folder" / "document.txt"
                source.parent.mkdir(exist_ok=True)
                write_repeated(source, text, mb * 10**6)
                for i in range(args.small_docs if layout == "document" else 0):
                    (source.parent / f"small{i}.txt").write_text(f"Small note {i}: the fox ran.\n" * 20)
                given = source if layout == "stories" else source.parent
                argv = [sys.executable, "-m", "moemla", "prepare", "--text", str(given), "--vocab-size", "4096",
                        "--val-fraction", "0.2", "--out", str(root / "out")]  # fmt: skip
                seconds, peak, code = run(argv, args.pythonpath)
                manifest = json.loads((root / "out" / "manifest.json").read_text()) if code == 0 else {}
                tokens = sum(s["tokens"] for s in manifest.get("splits", {}).values())
                rows.append({"mb": mb, "layout": layout, "seconds": round(seconds, 1), "peak_mib": round(peak),
                             "tokens": tokens, "exit": code, "long_stories": manifest.get("long_stories")})  # fmt: skip
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
                subprocess.run(["rm", "-rf", str(root)], check=True)
    from moemla.device import cpu_name

    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores\n")
    print("| input | layout | exit | time s | peak RSS MiB | tokens | stories cut (pieces) |")
    print("|---:|---|---:|---:|---:|---:|---|")
    for r in rows:
        cut = r["long_stories"] or {}
        print(f"| {r['mb']:,} MB | {r['layout']} | {r['exit']} | {r['seconds']:,} | {r['peak_mib']:,} | "
              f"{r['tokens']:,} | {cut.get('stories', '-')} ({cut.get('pieces', '-')}) |")  # fmt: skip
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
