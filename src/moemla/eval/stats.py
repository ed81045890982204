"""Judge-free statistics of generated stories: diversity, repetition, endings and length.

distinct-n (Li et al., 2016) is the share of unique word n-grams among all of a model's completions:
low values mean the model tells the same story over and over. The repeated 4-gram rate counts, within
each completion, the 4-grams already seen earlier in it: the loops small models fall into.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

WORD = re.compile(r"[\w']+|[^\w\s]")


@dataclass(frozen=True)
class Completion:
    prompt_id: int
    prompt: str
    text: str  # the continuation only, without the prompt and without <|endoftext|>
    tokens: int  # tokens generated, <|endoftext|> included
    ended: bool  # the model wrote <|endoftext|> before the token limit


def words(text: str) -> list[str]:
    """Lower-cased words and punctuation marks, the units the n-gram statistics count."""
    return WORD.findall(text.lower())


def ngrams(seq: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]


def distinct(texts: Sequence[str], n: int) -> float | None:
    """Unique word n-grams over all n-grams of all texts; None when there are none."""
    grams = [g for t in texts for g in ngrams(words(t), n)]
    return len(set(grams)) / len(grams) if grams else None


def repeated_rate(texts: Sequence[str], n: int = 4) -> float | None:
    """Share of word n-grams that repeat an earlier n-gram of the same text, over all texts."""
    repeats = total = 0
    for t in texts:
        grams = ngrams(words(t), n)
        repeats += len(grams) - len(set(grams))
        total += len(grams)
    return repeats / total if total else None


def sample_stats(completions: Sequence[Completion]) -> dict[str, float | int | None]:
    """The statistics of one model's completions, as one JSON-ready row."""
    texts = [c.text for c in completions]
    return {
        "samples": len(completions),
        "distinct_1": distinct(texts, 1),
        "distinct_2": distinct(texts, 2),
        "repeated_4gram_rate": repeated_rate(texts, 4),
        "ended_share": statistics.mean(c.ended for c in completions) if completions else None,
        "mean_tokens": statistics.mean(c.tokens for c in completions) if completions else None,
        "mean_words": statistics.mean(len(words(t)) for t in texts) if completions else None,
    }


STAT_COLUMNS = {
    "distinct_1": "distinct-1",
    "distinct_2": "distinct-2",
    "repeated_4gram_rate": "repeated 4-grams",
    "ended_share": "ended (end-of-text)",
    "mean_tokens": "mean tokens",
    "mean_words": "mean words",
}


def stats_markdown(rows: dict[str, dict[str, float | int | None]]) -> str:
    """One row per model: the sample statistics as a Markdown table."""
    lines = [
        "| model | samples | " + " | ".join(STAT_COLUMNS.values()) + " |",
        "| --- | --- |" + " --- |" * len(STAT_COLUMNS),
    ]
    for name, row in rows.items():
        cells = []
        for key in STAT_COLUMNS:
            value = row[key]
            cells.append("-" if value is None else f"{value:.1f}" if key.startswith("mean") else f"{value:.3f}")
        lines.append(f"| {name} | {row['samples']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
