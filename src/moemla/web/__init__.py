"""The exported model in a browser: `moemla export RUN OUT --format web` adds a static page and its JavaScript
libraries to an ONNX export folder (export.py, assets.py), `moemla web OUT` serves it (server.py)."""

PAGE_FILES = ("index.html", "app.js", "generate.js")  # from page/, beside the ONNX export's files
