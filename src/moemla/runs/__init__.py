"""The run folder, which every wing consumes: training creates it and writes through it, the rest only read."""

from moemla.runs.folder import RunError, RunFolder

__all__ = ["RunError", "RunFolder"]
