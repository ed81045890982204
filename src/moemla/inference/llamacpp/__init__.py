"""llama.cpp as an engine: a GGUF export folder (export/gguf.py) decoded through the xllamacpp binding, in a worker
process (worker.py), behind the Decoder interface (engine.py)."""
