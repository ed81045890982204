"""Story completions for quality evaluation: a versioned prompt set, seeded sampling, a cache on disk.

The shipped set (`stories-v1`) holds 100 story beginnings written for moemla and cut mid-sentence,
as the TinyStories evaluation does, so a model has to continue a sentence, not only start one.
Completion i continues prompt i mod len(prompts) with seed + i, so a rerun draws the same texts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from moemla.data.sources import DataError
from moemla.data.tokenizer import eot_id
from moemla.eval.stats import Completion
from moemla.inference.generate import generate_ids_batch
from moemla.inference.sampling import SamplingConfig, truncate_prompt
from moemla.progress import Progress
from moemla.runs import RunFolder

PROMPT_SETS = {"stories-v1": Path(__file__).parent / "prompts" / "stories-v1.txt"}
DEFAULT_PROMPTS = "stories-v1"


def load_prompts(spec: str = DEFAULT_PROMPTS) -> tuple[str, list[str]]:
    """(version, prompts) of a shipped set by name, or of a text file with one prompt per line (# comments)."""
    path = PROMPT_SETS.get(spec, Path(spec))
    if not path.is_file():
        raise DataError(f"prompt set {spec!r} is neither a shipped set ({', '.join(PROMPT_SETS)}) nor a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text; save the prompts as UTF-8, one per line") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not prompts:
        raise DataError(f"{path} holds no prompts; write one story beginning per line")
    version = spec if spec in PROMPT_SETS else f"{path.name}@{hashlib.sha256(text.encode()).hexdigest()[:12]}"
    return version, prompts


def read_jsonl(path: Path) -> Iterator[dict]:
    """The records of a JSONL cache, if it exists; a last line cut short by a kill is skipped."""
    if not path.is_file():
        return
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            yield json.loads(line)


@dataclass(frozen=True)
class SampleSettings:
    samples: int = 100
    max_new_tokens: int = SamplingConfig.max_new_tokens
    temperature: float = SamplingConfig.temperature
    top_k: int | None = SamplingConfig.top_k
    top_p: float | None = SamplingConfig.top_p
    seed: int = SamplingConfig.seed
    batch_size: int = 16  # completions decoded together (left-padded); part of the key, as it can flip near-ties

    def __post_init__(self) -> None:
        self.sampling()  # SamplingConfig's checks
        for name in ("samples", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.temperature, self.top_k, self.top_p, self.max_new_tokens, self.seed)


def _run_identity(run_dir: str | Path) -> dict[str, object]:
    """What the completions depend on: the run's folder and the checkpoint they come from."""
    from moemla.runs import RunFolder

    ckpt = RunFolder(run_dir).latest_checkpoint()
    if ckpt is None:
        raise DataError(f"{run_dir} has no checkpoint yet; train it before judging its stories")
    return {"run": str(Path(run_dir).resolve()), "checkpoint": ckpt.name}


def completions(
    run_dir: str | Path,
    prompts: list[str],
    version: str,
    settings: SampleSettings,
    cache: Path,
    device: str = "cpu",
) -> list[Completion]:
    """`settings.samples` completions of the run, read from `cache` (JSONL) where already drawn, else generated."""
    drawn_with = {k: v for k, v in asdict(settings).items() if not (k == "top_p" and v is None)}  # keys before top-p
    key = {**_run_identity(run_dir), "prompts": version, **drawn_with}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    found = {r["index"]: Completion(**r["completion"]) for r in read_jsonl(cache) if r.get("key") == digest}
    todo = [i for i in range(settings.samples) if i not in found]
    if todo:
        found.update(_generate(run_dir, prompts, settings, todo, device, cache, digest))
    return [found[i] for i in range(settings.samples)]


def _generate(
    run_dir: str | Path, prompts: list[str], settings: SampleSettings, todo: list[int], device: str, cache: Path,
    digest: str,
) -> dict[int, Completion]:  # fmt: skip
    from moemla.device import resolve_device

    run = RunFolder.open(run_dir)
    model, tok = run.load_model(resolve_device(device)), run.tokenizer()
    stop, sampling, context = eot_id(tok), settings.sampling(), model.cfg.max_seq_len
    out: dict[int, Completion] = {}
    with Progress(f"stories from {Path(run_dir).name}", total=len(todo), unit="stories") as bar, cache.open("a") as f:
        for lo in range(0, len(todo), settings.batch_size):
            group = todo[lo : lo + settings.batch_size]
            ids = [truncate_prompt(tok.encode(prompts[i % len(prompts)]).ids, context, sampling.max_new_tokens)
                   for i in group]  # fmt: skip
            drawn = generate_ids_batch(model, ids, sampling, stop=stop, seeds=[settings.seed + i for i in group])
            for i, new in zip(group, drawn, strict=True):
                ended = bool(new) and new[-1] == stop
                text = tok.decode([t for t in new if t != stop])
                c = Completion(i % len(prompts), prompts[i % len(prompts)], text, len(new), ended)
                out[i] = c
                f.write(json.dumps({"key": digest, "index": i, "completion": asdict(c)}) + "\n")
            f.flush()
            bar.advance(len(group))
    return out
