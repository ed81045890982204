import json
import subprocess
import sys
from pathlib import Path

import pytest

from moemla.cli import main
from moemla.config import VARIANTS

from .test_config import TABLE1


@pytest.mark.parametrize("size", list(TABLE1))
def test_info_json_matches_table1_for_dense_mha(size: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--preset", size, "--variant", "mha", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {"total_params", "active_params", "flops_per_token", "kv_cache_bytes_per_token"} <= set(info)
    assert abs(info["total_params"] / TABLE1[size] - 1) <= 0.015


def test_info_overrides_and_all_variants(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--preset", "xs", "--all-variants", "--json", "--vocab-size", "4096"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == len(VARIANTS) and {r["vocab_size"] for r in rows} == {4096}
    by_name = {r["variant"]: r for r in rows}
    assert by_name["moe-mla-rope"]["kv_cache_bytes_per_token"] * 2 == by_name["mha"]["kv_cache_bytes_per_token"]
    assert by_name["moe-mla-rope"]["active_params"] < by_name["moe-mla-rope"]["total_params"]
    assert main(["info", "--preset", "tiny", "--all-variants"]) == 0
    assert "moe-mla-rope" in capsys.readouterr().out


def test_info_rejects_bad_config_with_a_message(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--preset", "xs", "--dim", "100"]) == 2
    assert "dim=100 is not divisible by n_heads=8" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["info", "--attention", "gqa"])
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["info", "--bias", "maybe"])
    assert "expected true or false" in capsys.readouterr().err


def test_console_entry_point_runs() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "moemla", "info", "--preset", "debug", "--json"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["variant"] == "moe-mla-rope"


@pytest.mark.parametrize("command", ["train", "demo", "reproduce", "judge", "prepare", "eval"])
def test_ctrl_c_names_only_flags_the_command_has(
    command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import re

    from moemla.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]

    def interrupted(_: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(sub, "_defaults", {**sub._defaults, "func": interrupted})
    monkeypatch.setattr("moemla.cli.build_parser", lambda: parser)
    argv = {"eval": ["eval", "RUN"], "reproduce": ["reproduce", "table2"], "judge": ["judge", "RUN"]}
    assert main(argv.get(command, [command])) == 130
    err = capsys.readouterr().err
    assert err.startswith(f"moemla {command}: interrupted")
    flags = set(re.findall(r"--[a-z][a-z-]*", err))
    assert flags <= set(sub._option_string_actions), (
        f"{command}'s message names {flags - set(sub._option_string_actions)}"
    )


def test_train_help_states_the_defaults_a_new_run_gets(capsys: pytest.CaptureFixture[str]) -> None:
    from moemla.config import DEFAULT_PRESET, DEFAULT_VARIANT, ModelConfig

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    context = ModelConfig.from_preset(DEFAULT_PRESET, DEFAULT_VARIANT).max_seq_len
    assert "(default 1000 when --tokens is not given either)" in text and "(default None)" not in text
    assert "--compile {true,false,auto}" in text and f"at most the model's max_seq_len (default {context})" in text
    with pytest.raises(SystemExit):
        main(["train", "--compile", "maybe"])
    assert "expected true, false or auto" in capsys.readouterr().err


def test_long_work_reports_rate_and_eta_in_plain_lines_when_not_a_terminal(
    trained_debug_run, tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A pipe or log file gets a progress line every few seconds (here: every update), with rate and ETA."""
    import moemla.progress

    monkeypatch.setattr(moemla.progress, "PLAIN_EVERY_S", 0.0)
    data = json.loads((trained_debug_run / "run.json").read_text())["data"]["path"]
    train = ["--max-steps", "3", "--batch-size", "2", "--micro-batch-size", "2", "--seq-len", "32"]
    assert main(["train", "--data", data, "--out", str(tmp_path / "r"), "--preset", "debug", *train]) == 0
    err = capsys.readouterr().err
    assert "train r: 3/3 steps (100%) |" in err and "steps/s" in err and "| ETA 0 s | loss" in err
    argv = ["bench", "--preset", "debug", "--variants", "mha", "--new-tokens", "4", "--context", "16"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "bench mha batch 1:" in err and "decode steps/s" in err and "ETA" in err


def test_ctrl_c_in_training_says_what_a_resume_continues_from(
    trained_debug_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before the first checkpoint a resume starts over, and the message says so; after one it names it."""
    import shutil

    def interrupted(*_: object, **__: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("moemla.train.launch.train", interrupted)
    data = trained_debug_run.parent / "data"
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "new"), "--preset", "debug"]) == 130
    assert "no checkpoint yet: --resume starts over" in capsys.readouterr().err
    shutil.copytree(trained_debug_run, tmp_path / "old")
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "old"), "--resume"]) == 130
    err = capsys.readouterr().err
    assert "continues from its last checkpoint (step_" in err and "no checkpoint" not in err


def test_progress_bars_draw_on_stderr_so_stdout_keeps_only_results() -> None:
    """`moemla train > log` at a terminal: the bar goes where the terminal test was made (stderr)."""
    import sys

    from moemla.progress import Progress

    assert Progress("x", 3)._bar.console.file is sys.stderr


def test_reproduce_summary_names_a_truncated_results_file_and_a_missing_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "t2").mkdir()
    (tmp_path / "t2" / "results.json").write_text('{"table": "table2", "runs": [')
    assert main(["reproduce", "summary", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 't2' / 'results.json'} is not valid JSON" in err and err.count("\n") == 1
    assert main(["reproduce", "summary", "--out", str(tmp_path / "nowhere")]) == 1
    err = capsys.readouterr().err
    assert "nowhere is not a folder" in err and err.count("\n") == 1
