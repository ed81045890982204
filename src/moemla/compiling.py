"""torch.compile with a way back: where compiling fails (no C compiler, no Triton, an unsupported op), say so
once and run eagerly. Shared by training and decoding."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class CompiledOrEager:
    """fn compiled by torch.compile(**options); if its first call fails, one message through `log` and fn itself
    from then on. `then` ends the message: what happens next and how to skip the attempt."""

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        then: str,
        log: Callable[[str], None] = _stderr,
        recompile_limit: int | None = None,
        **options: Any,
    ) -> None:
        self.fn, self.then, self.log, self.tried = fn, then, log, False
        self.run = torch.compile(fn, **options)
        # NOTE: dynamo keeps at most 8 graphs per function by default; a decoder's few batch x length buckets
        # may need more, each traced once
        self.limit = recompile_limit

    def __call__(self, *args: Any) -> Any:
        if self.tried:
            return self._call(*args)
        self.tried = True
        try:
            return self._call(*args)
        except Exception as err:  # inductor and dynamo raise many kinds; each means: run eagerly
            first = str(err).splitlines()[0][:200] if str(err) else ""
            self.log(f"torch.compile is unavailable here ({type(err).__name__}: {first}); {self.then}")
            self.run = self.fn
            return self.run(*args)

    def _call(self, *args: Any) -> Any:
        if self.limit is None:
            return self.run(*args)
        with torch._dynamo.config.patch(recompile_limit=self.limit):
            return self.run(*args)
