import json
import shutil
from pathlib import Path

import pytest

from moemla.cli import main
from moemla.demo import run_demo
from tests.test_data import SHARED, needs_shared

TRAIN = [
    "--preset", "debug", "--batch-size", "4", "--micro-batch-size", "2", "--seq-len", "32", "--eval-interval", "2",
    "--ckpt-interval", "2", "--eval-tokens", "512",
]  # fmt: skip


def _json(capsys: pytest.CaptureFixture[str]) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _prepare_train_resume_eval(capsys: pytest.CaptureFixture[str], data: Path, run: Path) -> dict:
    assert main(["train", "--data", str(data), "--out", str(run), "--max-steps", "2", *TRAIN]) == 0
    assert main(["train", "--data", str(data), "--out", str(run), "--resume", "--max-steps", "3", *TRAIN]) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--json", "--max-tokens", "1024"]) == 0
    result = _json(capsys)
    assert {"val_loss", "val_ppl", "tokens", "expert_load_cv"} <= set(result)
    assert result["tokens"] > 0 and len(result["expert_load_cv"]) == 2
    return result


def test_builtin_prepare_train_resume_eval(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    assert main(["prepare", "--stories", "300", "--vocab-size", "300", "--out", str(data)]) == 0
    assert "validation stories" in capsys.readouterr().out
    _prepare_train_resume_eval(capsys, data, tmp_path / "run")
    assert main(["eval", str(tmp_path / "run"), "--json", "--text", str(data / "tokenizer.json")]) == 1  # not text


def test_resume_refuses_a_changed_model_in_one_place(
    trained_debug_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The CLI (flags) and the library (train with another config) meet the same check and the same message."""
    from moemla.config import ModelConfig
    from moemla.runs import RunError, RunFolder
    from moemla.train.config import TrainConfig
    from moemla.train.loop import train
    from moemla.train.resume import configs

    run = tmp_path / "run"
    shutil.copytree(trained_debug_run, run)
    meta = RunFolder.open(run).meta
    data = meta["data"]["path"]
    argv = ["train", "--data", data, "--out", str(run), "--resume", "--max-steps", "2", "--dim", "48"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "model settings cannot change (asked to change: dim)" in err and err.count("\n") == 1
    cfg, tc = configs(meta)
    other = ModelConfig.from_dict({**cfg.to_dict(), "n_heads": 2})
    with pytest.raises(RunError, match=r"asked to change: n_heads"):
        train(data, run, other, TrainConfig.from_dict({**tc.to_dict(), "max_steps": 2}), resume=True)


@needs_shared
def test_tinystories_sample_prepare_train_resume_eval(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "ts"
    sample = str(SHARED / "tinystories-train-sample.txt")
    assert (
        main(["prepare", "--text", sample, "--tokenizer", str(SHARED / "gpt2" / "tokenizer.json"), "--out", str(data)])
        == 0
    )
    result = _prepare_train_resume_eval(capsys, data, tmp_path / "run")
    assert result["val_loss"] < 10.9  # below uniform over GPT-2's 50,257 tokens
    assert main(["eval", str(tmp_path / "run"), "--json", "--text", sample, "--max-tokens", "512"]) == 0
    assert _json(capsys)["tokens"] == 512


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["train", "--data", "nowhere"], 1, "not a prepared data folder"),
        (["eval", "nowhere"], 1, "not a moemla run folder"),
        (["prepare", "--text", "missing.txt"], 1, "input file not found"),
        (["train", "--data", "nowhere", "--config", "missing.json"], 2, "config file not found"),
    ],
)
def test_bad_input_exits_with_a_message(
    argv: list[str], code: int, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_config_file_and_clear_config_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    assert main(["prepare", "--stories", "300", "--vocab-size", "300", "--out", str(data)]) == 0
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"preset": "debug", "optimizer": {}}))
    assert main(["train", "--data", str(data), "--config", str(bad)]) == 2
    assert "unknown key(s) ['optimizer']" in capsys.readouterr().err
    good = tmp_path / "run.toml"
    good.write_text('preset = "debug"\nvariant = "mha"\n[train]\nmax_steps = 1\nbatch_size = 2\nmicro_batch_size = 2\n')
    assert main(["train", "--data", str(data), "--config", str(good), "--out", str(tmp_path / "r"), "--json"]) == 0
    assert _json(capsys)["step"] == 1
    meta = json.loads((tmp_path / "r" / "run.json").read_text())
    assert meta["model"]["attention"] == "mha" and meta["model"]["vocab_size"] == 300
    assert meta["train"]["seq_len"] == 64  # follows the debug model's context
    assert main(["train", "--data", str(data), "--config", str(good), "--out", str(tmp_path / "r")]) == 1
    assert "--resume" in capsys.readouterr().err
    assert (
        main(["train", "--data", str(data), "--config", str(good), "--out", str(tmp_path / "s"), "--vocab-size", "100"])
        == 1
    )
    assert "vocab_size is 100" in capsys.readouterr().err


def test_demo_end_to_end_small(tmp_path: Path) -> None:
    result = run_demo(tmp_path / "demo", steps=2, stories=300)
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {"moe-mla-rope", "mha"}
    assert rows["moe-mla-rope"]["kv_cache_bytes_per_token"] * 2 == rows["mha"]["kv_cache_bytes_per_token"]
    assert rows["moe-mla-rope"]["active_params"] < rows["moe-mla-rope"]["total_params"]
    assert rows["mha"]["expert_load_cv"] is None and rows["moe-mla-rope"]["sample"].startswith("Once upon a time")
    for name in ("loss.png", "experts-moe-mla-rope.png", "summary.json"):
        assert (tmp_path / "demo" / name).stat().st_size > 0
    again = run_demo(tmp_path / "demo", steps=2, stories=300)  # finished runs are reused, not retrained
    assert again["rows"][0]["val_ppl"] == result["rows"][0]["val_ppl"]
