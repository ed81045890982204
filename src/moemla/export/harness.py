"""A moemla run as an lm-evaluation-harness model: `moemla lm-eval --model moemla --model_args run=RUN --tasks ...`.

Importing this module registers the model under the name "moemla" (lm-eval's own `lm_eval` command finds it
only where lm-eval loads the `lm_eval.models` entry points; `moemla lm-eval` always does).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import astuple
from itertools import groupby

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from moemla.data.sources import EOT
from moemla.device import resolve_device
from moemla.inference.generate import generate_ids_batch
from moemla.inference.sampling import SamplingConfig, greedy, truncate_prompt
from moemla.progress import Progress
from moemla.runs import RunFolder


def _device_name(device: str | None) -> str:
    """The device to resolve: lm-eval's own --device defaults to "cuda" whatever the machine, so that default
    (and no device) mean "auto", as its HF backend falls back; any other name is resolve_device's to check."""
    return "auto" if device in (None, "", "cuda") else device


@register_model("moemla")
class MoemlaLM(LM):
    """loglikelihood, loglikelihood_rolling and generate_until over a moemla checkpoint, batched."""

    def __init__(
        self,
        run: str | None = None,
        checkpoint: str | None = None,
        device: str | None = None,
        batch_size: int | str | None = 16,
        max_gen_toks: int = 256,
        pretrained: str | None = None,  # HF's name for it; lm-eval names the results folder after it
        **_: object,  # lm-eval passes settings other backends use (max_batch_size, ...)
    ) -> None:
        super().__init__()
        run = run or pretrained
        if run is None:
            raise ValueError("--model moemla needs --model_args run=RUN_FOLDER")
        folder = RunFolder.open(run)
        self.model = folder.load_model(resolve_device(_device_name(device)), checkpoint)
        self.tok = folder.tokenizer()
        self._device = next(self.model.parameters()).device
        self.eot = self.tok.token_to_id(EOT)
        # "auto" (lm-eval's probe for the largest batch) is taken as our default: small models fit any batch
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16
        self.max_gen_toks = int(max_gen_toks)
        self.max_length = self.model.cfg.max_seq_len

    def _encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def _pairs(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of context and continuation, split where the whole text's tokens split (as HF's harness)."""
        if not context:
            return [self.eot], self._encode(continuation)
        n_space = len(context) - len(context.rstrip())  # a trailing space belongs to the continuation
        if n_space:
            context, continuation = context[:-n_space], context[-n_space:] + continuation
        whole, ctx = self._encode(context + continuation), self._encode(context)
        return whole[: len(ctx)], whole[len(ctx) :]

    @torch.no_grad()
    def _score(self, pairs: list[tuple[list[int], list[int]]], bar: Progress | None = None) -> list[tuple[float, bool]]:
        """Sum of log p(continuation | context) and whether greedy decoding would produce it, per pair."""
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        for lo in range(0, len(order), self.batch_size):
            rows = []
            for i in order[lo : lo + self.batch_size]:
                ctx, cont = pairs[i]
                if not cont:
                    raise ValueError("an empty continuation has no likelihood to score")
                ids = (ctx + cont)[-(self.max_length + 1) :]  # the context is cut from the left to fit
                rows.append((i, ids[:-1], min(len(cont), len(ids) - 1)))
            width = max(len(x) for _, x, _ in rows)
            batch = torch.tensor([x + [self.eot] * (width - len(x)) for _, x, _ in rows], device=self._device)
            logprobs = F.log_softmax(self.model(batch)[0].float(), dim=-1)  # (B, T, V); right padding is never read
            for b, (i, x, n) in enumerate(rows):
                lp = logprobs[b, len(x) - n : len(x)]  # (n, V): the positions that predict the continuation
                target = torch.tensor(pairs[i][1][-n:], device=self._device)
                picked = lp.gather(-1, target[:, None])[:, 0]
                results[i] = (float(picked.sum()), bool((lp.argmax(-1) == target).all()))
            if bar is not None:
                bar.advance(len(rows))
        return results  # type: ignore[return-value]

    def loglikelihood(self, requests: Iterable) -> list[tuple[float, bool]]:
        pairs = [self._pairs(*req.args) for req in requests]
        with Progress("lm-eval loglikelihood", total=len(pairs), unit="requests") as bar:
            return self._score(pairs, bar)

    def loglikelihood_rolling(self, requests: Iterable) -> list[float]:
        reqs, out = list(requests), []
        with Progress("lm-eval rolling loglikelihood", total=len(reqs), unit="texts") as bar:
            for req in reqs:
                (text,) = req.args[:1]
                windows = get_rolling_token_windows(
                    token_list=self._encode(text), prefix_token=self.eot, max_seq_len=self.max_length, context_len=1
                )
                pairs = [make_disjoint_window(w) for w in windows]
                out.append(sum(lp for lp, _ in self._score(pairs)))
                bar.advance()
        return out

    def generate_until(self, requests: Iterable) -> list[str]:
        reqs = list(requests)
        results: list[str | None] = [None] * len(reqs)
        settings = [gen_settings(req.args[1], self.max_gen_toks) for req in reqs]

        def key(i: int) -> tuple:
            return astuple(settings[i][1])

        with Progress("lm-eval generate_until", total=len(reqs), unit="requests") as bar:
            for _, group in groupby(sorted(range(len(reqs)), key=key), key=key):
                idx = list(group)
                sampling = settings[idx[0]][1]
                for lo in range(0, len(idx), self.batch_size):
                    chunk = idx[lo : lo + self.batch_size]
                    prompts = [
                        truncate_prompt(self._encode(reqs[i].args[0]) or [self.eot], self.max_length,
                                        sampling.max_new_tokens)
                        for i in chunk
                    ]  # fmt: skip
                    outs = generate_ids_batch(self.model, prompts, sampling, stop=self.eot, seeds=[0] * len(chunk))
                    for i, ids in zip(chunk, outs, strict=True):
                        text = self.tok.decode([t for t in ids if t != self.eot])
                        for stop in settings[i][0]:
                            text = text.split(stop)[0] if stop else text
                        results[i] = text
                    bar.advance(len(chunk))
        return results  # type: ignore[return-value]


def gen_settings(kwargs: dict, max_gen_toks: int) -> tuple[list[str], SamplingConfig]:
    """(stop strings, sampling) from lm-eval's gen_kwargs: greedy unless do_sample; a sampled request takes
    temperature, top_k and top_p from its gen_kwargs where given, else SamplingConfig's defaults."""
    until = kwargs.get("until") or [EOT]
    until = [until] if isinstance(until, str) else list(until)
    max_new = int(kwargs.get("max_gen_toks", max_gen_toks))
    if not kwargs.get("do_sample", False):
        return until, greedy(max_new)
    d = SamplingConfig()
    top_k, top_p = kwargs.get("top_k", d.top_k), kwargs.get("top_p", d.top_p)
    temperature = float(kwargs.get("temperature", d.temperature))
    top_k = None if top_k is None or int(top_k) <= 0 else int(top_k)  # HF's top_k=0: no limit
    return until, SamplingConfig(temperature, top_k, None if top_p is None else float(top_p), max_new)
