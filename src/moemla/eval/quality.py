"""`moemla judge`: story completions from each run, judge-free statistics, and LLM-judge scores (Table 8).

Writes into `out`: completions.jsonl and judgments.jsonl (the caches: a rerun generates and asks
nothing twice), judge.json (every number), judge.md (the report) and judge.png (the chart).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from moemla.config import ConfigError, variant_name
from moemla.eval import report
from moemla.eval.judge import DIMENSIONS, RUBRIC_VERSION, Judge, JudgmentCache, judge_all, judgment_key
from moemla.eval.samples import SampleSettings, completions, load_prompts
from moemla.eval.stats import Completion, sample_stats, stats_markdown
from moemla.inference.sampling import SamplingConfig
from moemla.progress import Progress
from moemla.runs import RunFolder

COMPLETIONS, JUDGMENTS = "completions.jsonl", "judgments.jsonl"


def run_names(runs: list[str]) -> dict[str, str]:
    """A short, unique name per run folder: its own name, with its parent's where two share one."""
    names = [Path(r).resolve().name for r in runs]
    return {
        r: (f"{Path(r).resolve().parent.name}/{n}" if names.count(n) > 1 else n)
        for r, n in zip(runs, names, strict=True)
    }


def _final_bits_per_byte(run: str) -> float | None:
    val = [m for m in RunFolder(run).metrics() if m.get("split") == "val"]
    return val[-1].get("bits_per_byte") if val else None


def judge_runs(
    runs: list[str],
    out: str | Path,
    endpoint: str | None = None,
    model: str | None = None,
    prompts: str = "stories-v1",
    settings: SampleSettings | None = None,
    concurrency: int = 4,
    judge: Judge | None = None,
    device: str = "cpu",
    log: Callable[[str], None] = print,
) -> dict[str, object]:
    """Completions and their statistics for every run; with an endpoint (or a ready `judge`), judge scores too.

    Nothing leaves the machine unless `endpoint` (or `judge`) is given.
    """
    if not runs:
        raise ConfigError("give at least one run folder to judge")
    if concurrency < 1:
        raise ConfigError(f"--concurrency must be at least 1, got {concurrency}")
    if len(set(map(lambda r: str(Path(r).resolve()), runs))) != len(runs):
        raise ConfigError("a run folder is named twice; give each run once")
    if endpoint and not model and judge is None:
        raise ConfigError("--endpoint needs --model: the judge model's name at that endpoint, e.g. gpt-4o")
    if endpoint and judge is None:
        judge = Judge(endpoint, model)  # type: ignore[arg-type]
    if judge is not None:
        log(f"checking the judge {judge.model} at {judge.endpoint}")
        judge.probe()
    settings = settings or SampleSettings()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    version, texts = load_prompts(prompts)
    names = run_names(runs)
    variants = {names[r]: variant_name(RunFolder.open(r).model_config) or "custom" for r in runs}
    samples: dict[str, list[Completion]] = {}
    for r in runs:
        log(f"{names[r]}: {settings.samples} completions (prompts {version})")
        samples[names[r]] = completions(r, texts, version, settings, out / COMPLETIONS, device)
    stats = {name: sample_stats(c) for name, c in samples.items()}
    result: dict[str, object] = {
        "prompts": version,
        "sampling": asdict(settings),
        "runs": {names[r]: {"path": str(r), "variant": variants[names[r]]} for r in runs},
        "bits_per_byte": {names[r]: _final_bits_per_byte(r) for r in runs},
        "sample_stats": stats,
        "judge": None,
    }
    if judge is not None:
        result["judge"] = _judge(judge, samples, out, concurrency, log)
    (out / "judge.json").write_text(json.dumps(result, indent=1))
    (out / "judge.md").write_text(_markdown(result, variants))
    if judge is not None:
        report.bar_chart(result["judge"]["summary"], variants, out / "judge.png")  # type: ignore[index]
    log(f"wrote {out / 'judge.md'}, judge.json" + (", judge.png" if judge is not None else ""))
    return result


def _judge(
    judge: Judge, samples: dict[str, list[Completion]], out: Path, concurrency: int, log: Callable[[str], None]
) -> dict[str, object]:
    cache = JudgmentCache(out / JUDGMENTS)
    items = [(name, i, c) for name, cs in samples.items() for i, c in enumerate(cs)]
    before = judge.requests
    with Progress(f"judging with {judge.model}", total=len(items), unit="judgments") as bar:
        cached = sum(judgment_key(c.prompt, c.text, judge.model) in cache.records for _, _, c in items)
        bar.advance(cached)  # cached judgments cost nothing
        records = judge_all(judge, [(c.prompt, c.text) for _, _, c in items], cache, concurrency, bar.advance)
    scores: report.Scores = {name: {d: {} for d in DIMENSIONS} for name in samples}
    unparsed = dict.fromkeys(samples, 0)
    for (name, i, _), rec in zip(items, records, strict=True):
        if rec["scores"] is None:
            unparsed[name] += 1
            continue
        for d in DIMENSIONS:
            scores[name][d][i] = rec["scores"][d]
    made, bad = judge.requests - before, sum(unparsed.values())
    log(f"judge {judge.model}: {len(items) - cached} new judgments ({made} requests), {cached} from the cache, "
        f"{bad} of {len(items)} replies unreadable")  # fmt: skip
    return {
        "endpoint": judge.endpoint,
        "model": judge.model,
        "rubric": RUBRIC_VERSION,
        "requests": made,
        "judged": len(items),
        "unparsed": bad,
        "summary": report.summarize_scores(scores, unparsed),
    }


def _sampling(settings: dict) -> SamplingConfig:
    """The SamplingConfig a report's recorded settings describe (reports written before top-p have none)."""
    return SampleSettings(**{k: v for k, v in settings.items() if k in SampleSettings.__dataclass_fields__}).sampling()


def _markdown(result: dict, variants: dict[str, str]) -> str:
    s = result["sampling"]
    parts = [
        "# Story quality",
        f"{s['samples']} completions per model from the prompt set `{result['prompts']}`: at most "
        f"{s['max_new_tokens']} new tokens, {_sampling(s).describe()}, seed {s['seed']} "
        "(completion i continues prompt i mod the set's size with seed + i).",
    ]
    if result["judge"] is not None:
        j = result["judge"]
        parts += [
            f"## Judge scores ({j['model']} at {j['endpoint']}, rubric {j['rubric']})",
            "Mean ± std [95% t-interval] per dimension, 1-10; unparsed replies are counted, not scored. "
            "The paper's Table 8 rows judge 12L-1024d models with GPT-4, so compare directions, not levels.",
            report.scores_markdown(j["summary"], variants),
            report.split_half_text(j["summary"]),
            "### Paired differences (same prompt and seed)",
            report.paired_markdown(j["summary"]),
            "![judge scores](judge.png)",
        ]
    else:
        parts.append("No judge scores: run with `--endpoint URL --model NAME` to add them.")
    bpb = result["bits_per_byte"]
    parts += [
        "## Judge-free statistics",
        stats_markdown(result["sample_stats"]),
        "Validation bits per byte at the end of training: "
        + ", ".join(f"{n} {v:.4f}" if v is not None else f"{n} -" for n, v in bpb.items())
        + ".",
    ]
    return "\n\n".join(parts) + "\n"
