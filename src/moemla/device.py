"""Device and precision choices, shared by every wing that runs a model: training, evaluation, decoding, serving."""

from __future__ import annotations

import contextlib

import torch

from moemla.accounting import FLOAT_BYTES

# the weight dtypes a user may name (--dtype): export, bench and decoding read this one table (accounting's names)
DTYPES = {name: getattr(torch, name) for name in FLOAT_BYTES}


def cpu_name() -> str:
    """The CPU's model name as `lscpu` prints it ("?" where lscpu is missing): benchmarks record it beside their
    numbers, since our machines differ (AMD EPYC with AVX2, Intel Xeon with AVX-512 and AMX)."""
    import subprocess

    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return "?"
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when available, else the CPU; asking for CUDA where there is none is a one-line error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


def describe(device: torch.device, processes: int = 1) -> str:
    """What trained a run, for the records a reader compares times by: the GPU's name, or the CPU's threads."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        threads = torch.get_num_threads()
        name = f"{device.type}, {threads} thread{'s' if threads > 1 else ''}"
    return f"{processes} x {name}" if processes > 1 else name


def amp_dtype(device: torch.device, amp: str) -> torch.dtype | None:
    """The autocast dtype for an `amp` setting: auto means bf16 on CUDA and full precision on CPU."""
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
