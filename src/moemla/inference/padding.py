"""Left padding of a batch of prompts: every engine's one rule (the torch decoder's KVCache.pad, the ONNX engine's
attention mask), in a torch-free module so that the engines without torch share it."""

from __future__ import annotations

from collections.abc import Sequence


def left_pad(prompts: Sequence[Sequence[int]]) -> tuple[list[list[int]], list[int]]:
    """Prompts padded on the left to the longest (with token 0, never attended to) and each one's pad count."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("give one or more non-empty prompts")
    longest = max(len(p) for p in prompts)
    pad = [longest - len(p) for p in prompts]
    return [[0] * n + list(p) for n, p in zip(pad, prompts, strict=True)], pad
