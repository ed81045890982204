import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moemla.cli import main
from moemla.eval.judge import Judge, JudgeError, JudgmentCache, judge_all, judge_messages, parse_scores
from moemla.eval.quality import judge_runs
from moemla.eval.report import paired_differences, split_half
from moemla.eval.samples import SampleSettings, load_prompts
from moemla.eval.stats import Completion, distinct, repeated_rate, sample_stats

from .fake_judge import MODEL, FakeJudge, expected_scores

pytest.importorskip("openai")
SETTINGS = SampleSettings(samples=6, max_new_tokens=12, batch_size=4)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    root = tmp_path_factory.mktemp("judge")
    data = root / "data"
    assert main(["prepare", "--stories", "300", "--vocab-size", "300", "--out", str(data)]) == 0
    out = []
    for variant in ("mha", "moe-mla-rope"):
        run = root / variant
        train = ["--max-steps", "2", "--batch-size", "2", "--micro-batch-size", "2", "--seq-len", "32"]
        argv = ["train", "--data", str(data), "--out", str(run), "--preset", "debug", "--variant", variant, *train]
        assert main(argv) == 0
        out.append(str(run))
    return out


def test_parse_scores_reads_json_wrapped_json_and_loose_lines() -> None:
    want = {"grammar": 7, "coherence": 5, "creativity": 6, "overall": 6}
    assert parse_scores(json.dumps(want)) == want
    assert parse_scores(f"Sure! ```json\n{json.dumps(want)}\n``` done") == want
    assert parse_scores('Grammar: 7/10\nCoherence: 5\ncreativity = 6\n"overall": 6') == want
    assert parse_scores('{"grammar": 7, "coherence": 5, "creativity": 6, "overall": 6.0}') == want
    bad = [
        "no scores",
        '{"grammar": 11, "coherence": 5, "creativity": 6, "overall": 6}',
        '{"grammar": 7, "coherence": 5}',
        '{"grammar": "7", "coherence": 5, "creativity": 6, "overall": 6}',
    ]
    assert all(parse_scores(b) is None for b in bad)


def test_request_follows_the_papers_template_with_a_rubric_per_dimension() -> None:
    user = judge_messages("Once upon a time, a cat", " sat on a mat.")[-1]["content"]
    assert user.startswith("Evaluate the following story completion on a scale of 1-10")
    assert "use the full range of scores" in user and "Story prompt: Once upon a time, a cat" in user
    for name in ("Grammatical Correctness", "Narrative Coherence", "Creativity", "Overall Quality"):
        assert name in user


def test_shipped_prompts_are_100_versioned_beginnings_cut_mid_sentence(tmp_path: Path) -> None:
    version, prompts = load_prompts()
    assert version == "stories-v1" and len(prompts) == 100 == len(set(prompts))
    assert all(not p.endswith((".", "!", "?", '"')) for p in prompts)
    f = tmp_path / "mine.txt"
    f.write_text("# mine\nThe dog\n\nA cat\n")
    version, prompts = load_prompts(str(f))
    assert prompts == ["The dog", "A cat"] and version.startswith("mine.txt@")
    f.write_bytes(b"caf\xe9\n")
    with pytest.raises(ValueError, match="not UTF-8"):
        load_prompts(str(f))


def test_sample_statistics() -> None:
    assert distinct(["a b a b"], 1) == 0.5 and distinct(["a b a b"], 2) == pytest.approx(2 / 3)
    assert repeated_rate(["x y z w x y z w"], 4) == pytest.approx(1 / 5)
    assert repeated_rate(["one two"], 4) is None
    rows = sample_stats([Completion(0, "p", "The cat sat.", 5, True), Completion(1, "p", "The dog", 9, False)])
    assert rows["ended_share"] == 0.5 and rows["mean_tokens"] == 7 and rows["mean_words"] == 3


def test_split_half_and_paired_differences() -> None:
    scores = {
        "a": {d: {i: 8 + i % 2 for i in range(10)} for d in ("grammar", "coherence", "creativity", "overall")},
        "b": {d: {i: 4 + (i % 3 == 0) for i in range(10)} for d in ("grammar", "coherence", "creativity", "overall")},
    }
    scores["b"]["overall"] = {i: 2 for i in range(10)}
    sh = split_half(scores)
    assert sh["cells"] == 8 and sh["r"] > 0.9
    paired = [r for r in paired_differences(scores) if r["dimension"] == "grammar"]
    assert len(paired) == 1 and paired[0]["mean"] == pytest.approx(8.5 - 4.4) and paired[0]["p"] < 1e-6


def test_judge_retries_on_429_500_timeouts_and_records_unparsed_replies(tmp_path: Path) -> None:
    script = ["429", "500", "slow", "ok", "garbage", "garbage", "garbage", "wrapped"]
    with FakeJudge(script) as fake:
        judge = Judge(fake.url, MODEL, backoff=0.01, timeout=0.25, parse_retries=2)
        cache = JudgmentCache(tmp_path / "j.jsonl")
        first = judge_all(judge, [("p", "one")], cache, concurrency=1)[0]  # 429, 500, timeout, then ok
        assert first["scores"] == expected_scores("one") and fake.requests == 4
        second = judge_all(judge, [("p", "two")], cache, concurrency=1)[0]  # three garbage replies
        assert second["scores"] is None and second["unparsed"] and second["reply"] == "I cannot rate this story."
        third = judge_all(judge, [("p", "three")], cache, concurrency=1)[0]  # JSON wrapped in prose
        assert third["scores"] == expected_scores("three") and fake.requests == 8
        # all three are cached, the unparsed one included: asking again costs nothing
        again = judge_all(judge, [("p", "one"), ("p", "two"), ("p", "three")], JudgmentCache(cache.path), 2)
        assert fake.requests == 8 and [r["scores"] for r in again] == [first["scores"], None, third["scores"]]


def test_clear_errors_for_unreachable_endpoint_refused_key_and_unknown_model(tmp_path: Path) -> None:
    cache = JudgmentCache(tmp_path / "j.jsonl")
    with FakeJudge(key="right") as fake:
        url = fake.url
        os.environ["OPENAI_API_KEY"] = "wrong-secret"
        try:
            with pytest.raises(JudgeError, match="refused the key") as err:
                judge_all(Judge(fake.url, MODEL), [("p", "c")], cache)
            assert "wrong-secret" not in str(err.value)
        finally:
            del os.environ["OPENAI_API_KEY"]
    with FakeJudge() as fake, pytest.raises(JudgeError, match="does not know model 'gpt-99'"):
        judge_all(Judge(fake.url, "gpt-99"), [("p", "c")], cache)
    with pytest.raises(JudgeError, match="no endpoint reachable"):
        judge_all(Judge(url, MODEL, retries=1, backoff=0.01), [("p", "c")], cache)
    assert not cache.records


def test_judge_runs_writes_report_chart_and_caches_and_reruns_for_free(runs: list[str], tmp_path: Path) -> None:
    out = tmp_path / "out"
    with FakeJudge(["500", "garbage", "garbage", "garbage"]) as fake:
        judge = Judge(fake.url, MODEL, backoff=0.01)
        result = judge_runs(runs, out, judge=judge, settings=SETTINGS, concurrency=1, log=lambda _: None)
        first = fake.requests
        summary = result["judge"]["summary"]
        assert summary["unparsed"] == {"mha": 1, "moe-mla-rope": 0}
        assert summary["models"]["mha"]["overall"]["n"] == 5 and summary["models"]["moe-mla-rope"]["grammar"]["n"] == 6
        lines = [json.loads(line) for line in (out / "judgments.jsonl").read_text().splitlines()]
        assert len(lines) == 12 and all(r["model"] == MODEL for r in lines)
        for r in lines:
            assert r["scores"] is None or r["scores"] == expected_scores(r["completion"])
        md = (out / "judge.md").read_text()
        assert "Grammatical Correctness" in md and "paper: moe-mla-rope" in md and "8.2 ± 0.6" in md
        assert "Split-half correlation" in md and "mha - moe-mla-rope" in md and "distinct-2" in md
        assert (out / "judge.png").stat().st_size > 10_000
        # a second run draws the same completions (seeded, cached) and makes zero requests
        again = judge_runs(runs, out, fake.url, MODEL, settings=SETTINGS, log=lambda _: None)
        assert fake.requests == first and again["judge"]["requests"] == 0
        assert again["sample_stats"] == result["sample_stats"]


def test_offline_statistics_need_no_endpoint(runs: list[str], tmp_path: Path, capsys) -> None:
    argv = ["judge", *runs, "--offline", "--out", str(tmp_path), "--samples", "4", "--max-new-tokens", "10", "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["judge"] is None and set(result["sample_stats"]) == {"mha", "moe-mla-rope"}
    row = result["sample_stats"]["mha"]
    assert row["samples"] == 4 and 0 < row["distinct_1"] <= 1 and row["mean_tokens"] <= 10
    assert all(v is not None and v > 0 for v in result["bits_per_byte"].values())
    assert not (tmp_path / "judgments.jsonl").exists()
    assert main(["judge", *runs, "--out", str(tmp_path)]) == 2
    assert "--offline" in capsys.readouterr().err
    assert main(["judge", runs[0], "--endpoint", "http://127.0.0.1:9/v1", "--out", str(tmp_path)]) == 2
    assert "needs --model" in capsys.readouterr().err


def test_a_judge_run_killed_halfway_resumes_without_asking_twice(runs: list[str], tmp_path: Path) -> None:
    out = tmp_path / "out"
    samples = ["--samples", "8", "--max-new-tokens", "12", "--batch-size", "4", "--concurrency", "1"]
    with FakeJudge(delay=0.3) as fake:
        argv = [sys.executable, "-m", "moemla", "judge", runs[0], "--endpoint", fake.url, "--model", MODEL,
                "--out", str(out), *samples]  # fmt: skip
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        cache = out / "judgments.jsonl"
        deadline = time.time() + 120
        while time.time() < deadline and (not cache.exists() or len(cache.read_text().splitlines()) < 3):
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        done = len(JudgmentCache(cache).records)
        assert 3 <= done < 8, proc.stderr.read().decode() if proc.stderr else ""
        fake.delay, before = 0.0, fake.requests
        assert main(["judge", runs[0], "--endpoint", fake.url, "--model", MODEL, "--out", str(out), *samples]) == 0
        assert fake.requests - before == 8 - done
    assert len(JudgmentCache(cache).records) == 8


def test_reproduce_table8_judges_the_four_variants_beside_the_paper(tmp_path: Path) -> None:
    from moemla.data.shards import write_prepared
    from moemla.data.sources import builtin_source
    from moemla.experiments.reproduce import reproduce

    data = tmp_path / "data"
    write_prepared(builtin_source(300), data, {"dataset": "builtin", "stories": 300}, vocab_size=300)
    with FakeJudge() as fake:
        result = reproduce("table8", "debug", steps=2, data=data, out=tmp_path / "t8", log=lambda _: None,
                           endpoint=fake.url, judge_model=MODEL, samples=3)  # fmt: skip
        assert fake.requests == 12
    rows = {r["name"]: r for r in result["summary"]}
    assert list(rows) == ["mha", "mla-rope", "moe-mha", "moe-mla-rope"]
    assert all(r["judge"]["overall"]["n"] == 3 and r["sample_stats"]["samples"] == 3 for r in rows.values())
    md = (tmp_path / "t8" / "table8.md").read_text()
    assert "| moe-mla-rope |" in md and "8.2 / 7.9 / 8.1 / 8.1" in md
    claim = next(c for c in result["claims"] if "Table 8" in c.text)
    assert claim.verdict in ("holds", "partly holds", "does not hold") and "best on" in claim.ours
    assert (tmp_path / "t8" / "judge" / "judge.md").is_file()


def test_an_unreachable_judge_fails_before_any_completion_is_generated(runs: list[str], tmp_path: Path) -> None:
    with FakeJudge() as fake:
        url = fake.url  # closed once the block ends: nothing listens there any more
    judge = Judge(url, MODEL, retries=1, backoff=0.01)
    start = time.perf_counter()
    with pytest.raises(JudgeError, match="no endpoint reachable"):
        judge_runs(runs, tmp_path / "out", judge=judge, settings=SETTINGS, log=lambda _: None)
    assert time.perf_counter() - start < 10
    assert not (tmp_path / "out" / "completions.jsonl").exists()


def test_an_unreadable_reply_is_asked_again_differently(tmp_path: Path) -> None:
    with FakeJudge(["garbage"]) as fake:
        judge = Judge(fake.url, MODEL, backoff=0.01, parse_retries=2)
        record = judge_all(judge, [("p", "one")], JudgmentCache(tmp_path / "j.jsonl"), concurrency=1)[0]
        first, second = fake.bodies
    assert record["scores"] == expected_scores("one") and record["attempts"] == 2
    assert first["temperature"] == 0.0 and second["temperature"] > 0.0
    assert second["messages"][2] == {"role": "assistant", "content": "I cannot rate this story."}
    assert "could not be read" in second["messages"][3]["content"]


def test_judge_exits_nonzero_when_too_many_replies_are_unreadable(
    runs: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = ["--samples", "2", "--max-new-tokens", "8", "--out", str(tmp_path / "out"), "--model", MODEL]
    with FakeJudge(["garbage"] * 6) as fake:  # both completions: three unreadable replies each
        assert main(["judge", runs[0], "--endpoint", fake.url, *flags]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "2 of 2 replies (100%) could not be read" in err[-1] and "--max-unparsed" in err[-1]
    assert (tmp_path / "out" / "judge.md").exists()  # the report is written all the same
    with FakeJudge() as fake:  # cached unreadable replies still count; a looser bar passes
        assert main(["judge", runs[0], "--endpoint", fake.url, *flags, "--max-unparsed", "1"]) == 0
