import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from moemla.cli import main
from moemla.data.shards import eval_batches
from moemla.data.tokenizer import token_bytes, train_bpe
from moemla.eval.perplexity import evaluate
from tests.test_data import SHARED, needs_shared

from .conftest import build


def window_bytes(
    shards: list[np.ndarray], seq_len: int, batch_size: int, max_tokens: int | None, table: np.ndarray
) -> tuple[int, int]:
    """(target tokens, their text bytes) of the windows `evaluate` scores with the same settings, counted here
    from eval_batches on their own: what evaluate's bits per byte must divide by."""
    tokens = n_bytes = 0
    for _, y in eval_batches(shards, seq_len, batch_size, max_tokens):
        tokens += y.numel()
        n_bytes += int(table[y.numpy()].sum())
    return tokens, n_bytes


TEXT = ['Lily found a shiny red ball. She said, "Look!" Then the café closed — über früh.', "The end. 🐰"] * 40


def _bpe() -> Tokenizer:
    return train_bpe(iter(TEXT), 300)


def test_token_bytes_sum_to_the_texts_utf8_bytes_and_specials_count_zero() -> None:
    tok = _bpe()
    table = token_bytes(tok)
    for text in TEXT[:2]:
        assert table[tok.encode(text).ids].sum() == len(text.encode("utf-8"))
    assert table[tok.token_to_id("<|endoftext|>")] == 0


@needs_shared
def test_token_bytes_of_gpt2_match_the_tinystories_bytes() -> None:
    tok = Tokenizer.from_file(str(SHARED / "gpt2" / "tokenizer.json"))
    stories = (SHARED / "tinystories-train-sample.txt").read_text().split("<|endoftext|>")[:50]
    table = token_bytes(tok)
    for story in stories:
        assert table[tok.encode(story).ids].sum() == len(story.encode("utf-8"))


def test_bits_per_byte_is_the_loss_in_bits_over_the_text_bytes() -> None:
    tok = _bpe()
    ids = np.array([i for t in TEXT for i in [*tok.encode(t).ids, 0]], dtype=np.int64)
    model = build("moe-mla-rope", vocab_size=tok.get_vocab_size())
    table = token_bytes(tok)
    result = evaluate(model, [ids], seq_len=32, batch_size=4, token_bytes=table)
    tokens, n_bytes = window_bytes([ids], 32, 4, None, table)
    assert tokens == result["tokens"]
    expected = result["val_loss"] * tokens / math.log(2) / n_bytes
    assert result["bits_per_byte"] == pytest.approx(expected, rel=1e-9)
    # by hand: every window's loss summed in nats, over the bytes of its targets
    nats, total_bytes = 0.0, 0
    with torch.no_grad():
        for x, y in eval_batches([ids], 32, 4):
            logits, _ = model(x)
            nats += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum"))
            total_bytes += int(table[y.numpy()].sum())
    assert result["bits_per_byte"] == pytest.approx(nats / math.log(2) / total_bytes, rel=1e-5)


def test_eval_json_has_bits_per_byte_and_a_null_interval_for_one_batch(tmp_path: Path, capsys) -> None:
    data, run = tmp_path / "data", tmp_path / "run"
    assert main(["prepare", "--stories", "300", "--vocab-size", "300", "--out", str(data)]) == 0
    assert main(["train", "--data", str(data), "--out", str(run), "--preset", "debug", "--max-steps", "1",
                 "--batch-size", "2", "--micro-batch-size", "2", "--seq-len", "32"]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["eval", str(run), "--json", "--max-tokens", "32", "--batch-size", "1"]) == 0
    out = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads(out)  # strict JSON: no NaN
    assert result["batches"] == 1 and result["val_ppl_ci95"] is None
    assert 0 < result["bits_per_byte"] < 20
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(m["bits_per_byte"] > 0 for m in metrics if m["split"] == "val")
    assert main(["eval", str(run), "--max-tokens", "32", "--batch-size", "1"]) == 0
    assert "bits per byte" in capsys.readouterr().out
