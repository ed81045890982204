"""`moemla export RUN OUT --format web`: the ONNX export folder plus the page that runs it in a browser.

The folder is static: index.html, app.js and generate.js (this package's page/), the pinned onnxruntime-web and
tokenizers files under vendor/ (assets.py), and the ONNX export itself (model.onnx, manifest.json,
tokenizer.json). Once written it needs no network; any static file server shows it, `moemla web` with threads.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from moemla.folders import assembled, check_destination, file_sizes, write_text_atomic
from moemla.inference.onnx import MANIFEST
from moemla.inference.onnx.write import OnnxQuantize, check_exportable
from moemla.web import PAGE_FILES
from moemla.web.assets import PAGE, copy_assets, resolve_assets


def add_page(folder: Path, node_modules: str | Path | None = None, sources: dict | None = None) -> dict[str, object]:
    """Add the page and its libraries (`sources` as resolve_assets found them, or found now) to the ONNX export
    folder `folder`; its manifest then lists every file the page loads (so `moemla web` and read_manifest find a
    missing one) and the libraries' versions."""
    sources = sources if sources is not None else resolve_assets(node_modules)
    for name in PAGE_FILES:
        shutil.copyfile(PAGE / name, folder / name)
    versions = copy_assets(sources, folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"] = file_sizes(folder)
    manifest["web"] = {"libraries": versions, "page": list(PAGE_FILES)}
    write_text_atomic(folder / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest


def export_web(
    run_dir: str | Path, out_dir: str | Path, *, quantize: OnnxQuantize = "int8", checkpoint: str | None = None,
    overwrite: bool = False, node_modules: str | Path | None = None,
) -> dict[str, object]:  # fmt: skip
    """Write the run as a web export folder; returns its manifest. Int8 by default: a quarter of fp32's download
    at +0.03% perplexity (BENCHMARKS.md, "Quantized exports")."""
    from moemla.export.onnx import write_export
    from moemla.runs import RunFolder

    run = RunFolder.open(run_dir)
    check_exportable(run.model_config, quantize)  # a run that is not portable: before any work
    out = check_destination(out_dir, "export", sources=(run_dir,), overwrite=overwrite)
    sources = resolve_assets(node_modules)  # fetch (or find) the libraries first: no network fails before the export
    with assembled(out, "web") as folder:
        write_export(run, folder, quantize, checkpoint)
        manifest = add_page(folder, sources=sources)
    return manifest
