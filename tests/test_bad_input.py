"""Failures that once ended in a traceback or silently wrong output (issue 16): each is one clear line now."""

import errno
import io
import json
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import SafetensorError

from moemla.cli import main
from moemla.data.shards import write_prepared
from moemla.data.sources import builtin_source, file_source
from moemla.inference.generate import generate_ids
from moemla.inference.sampling import SamplingConfig
from moemla.runs import RunFolder, checkpoint
from moemla.runs.checkpoint import CheckpointError
from moemla.runs.folder import RunError
from moemla.train.loop import train
from tests.test_train import TC, cfg, weights

from .conftest import build


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "builtin"
    write_prepared(builtin_source(400), out, {"dataset": "builtin", "stories": 400}, vocab_size=300)
    return out


@pytest.fixture(scope="module")
def run(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "r"
    train(data, out, cfg(), TC.replace(max_steps=6), log=lambda _: None)  # checkpoints at steps 3 and 6
    return out


@pytest.mark.parametrize(
    "failure",
    [
        RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/3"),
        SafetensorError("Error while serializing: IoError(No space left on device)"),
    ],
)
def test_wrapped_write_errors_while_checkpointing_keep_the_previous_one(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: Exception
) -> None:
    run = tmp_path / "r"
    train(data, run, cfg(), TC.replace(max_steps=3), log=lambda _: None)

    def fail(*args: object, **kw: object) -> None:
        raise failure

    target = "save" if isinstance(failure, RuntimeError) else "save_file"
    monkeypatch.setattr(checkpoint.torch if target == "save" else checkpoint, target, fail)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: type("u", (), {"free": 0})())
    with pytest.raises(CheckpointError, match=r"step 6: the disk is full; the previous checkpoint .*step_00000003"):
        train(data, run, cfg(), TC, resume=True, log=lambda _: None)
    assert checkpoint.latest(run).name == "step_00000003"
    assert not list((run / "checkpoints").glob(".tmp-*"))


def test_resume_on_a_full_disk_is_one_line_and_leaves_run_json_intact(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "r"
    train(data, run, cfg(), TC.replace(max_steps=3), log=lambda _: None)
    before = (run / "run.json").read_text()
    real_open = Path.open

    def full_open(self: Path, mode: str = "r", *args: object, **kw: object) -> io.IOBase:
        if self.name.endswith(".tmp") and "w" in mode:
            real_open(self, mode, *args, **kw).close()  # the 0-byte file a failed write leaves
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(self, mode, *args, **kw)

    monkeypatch.setattr(Path, "open", full_open)
    with pytest.raises(RunError, match=r"could not write .*run.json: the disk is full"):
        train(data, run, cfg(), TC, resume=True, log=lambda _: None)
    monkeypatch.undo()
    assert (run / "run.json").read_text() == before and not list(run.glob("*.tmp"))


@pytest.mark.parametrize("content", ["garbage", "hostile"])
def test_corrupt_or_hostile_optimizer_state_is_one_line(
    run: Path, tmp_path: Path, content: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    target = checkpoint.latest(copy) / checkpoint.OPTIMIZER

    class Evil:
        def __reduce__(self) -> tuple:
            return (print, ("pwned",))

    target.write_bytes(b"garbage" if content == "garbage" else pickle.dumps({"optimizer": Evil()}))
    with (
        warnings.catch_warnings(),
        pytest.raises(CheckpointError, match=r"optimizer.pt is not a moemla checkpoint.*--checkpoint step_N") as err,
    ):
        warnings.simplefilter("error")  # our line alone, no torch warning before it
        checkpoint.load(checkpoint.latest(copy))
    assert "weights_only" not in str(err.value)
    assert "pwned" not in capsys.readouterr().out


def test_a_second_writer_is_refused_and_a_stale_lock_does_not_block(data: Path, tmp_path: Path) -> None:
    run = tmp_path / "r"
    with RunFolder(run).lock(), pytest.raises(RunError, match=r"in use by process \d+"):
        train(data, run, cfg(), TC.replace(max_steps=2), log=lambda _: None)
    assert not (run / "metrics.jsonl").exists()
    (run / ".lock").write_text("process 999999 on a killed host")  # left by a killed run: no flock is held
    train(data, run, cfg(), TC.replace(max_steps=2), log=lambda _: None)
    assert checkpoint.latest(run) is not None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"top_p": 0.0}, "--top-p must be in"),
        ({"temperature": float("nan")}, "--temperature must be a finite"),
        ({"temperature": -1.0}, "--temperature must be a finite"),
        ({"top_k": 0}, "--top-k must be at least 1"),
        ({"top_k": -3}, "--top-k must be at least 1"),
        ({"max_new_tokens": -4}, "--max-new-tokens must be at least 0"),
        ({"seed": -1}, "--seed must be in"),
        ({"seed": 2**64}, "--seed must be in"),
    ],
)
def test_sampling_settings_are_checked_once_for_api_and_cli(kwargs: dict, message: str) -> None:
    model = build("mha")
    args = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        generate_ids(model, [1, 2], SamplingConfig(**args))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", "RUN", "--top-p", "0"], "--top-p must be in"),
        (["serve", "RUN", "--port", "99999"], "--port must be in 0..65535"),
        (["generate", "RUN", "--temperature", "nan"], "--temperature must be a finite"),
        (["generate", "RUN", "--temperature", "-1"], "--temperature must be a finite"),
        (["generate", "RUN", "--max-new-tokens", "-4"], "--max-new-tokens must be at least 0"),
        (["train", "--out", "RUN", "--resume", "--eval-tokens", "0"], "eval_tokens must be at least 1"),
        (["train", "--out", "RUN", "--resume", "--grad-clip", "-1"], "grad_clip must be >= 0"),
        (["eval", "RUN", "--checkpoint", "step_5"], "has no checkpoint 'step_5'; it has: step_00000003, step_00000006"),
        (["train", "--out", "RUN", "--checkpoint", "step_3"], "needs --resume"),
    ],
)
def test_cli_bad_values_exit_with_one_line(
    run: Path, data: Path, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [str(run) if a == "RUN" else a for a in argv]
    if argv[0] == "train":
        argv += ["--data", str(data)]
    assert main(argv) in (1, 2)
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_checkpoint_flag_picks_an_earlier_checkpoint(
    run: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    losses = {}
    for name in ("step_3", "step_00000006", None):
        assert main(["eval", str(run), "--json", "--max-tokens", "256", *(["--checkpoint", name] if name else [])]) == 0
        losses[name] = json.loads(capsys.readouterr().out)["val_loss"]
    assert losses["step_3"] != losses["step_00000006"] == losses[None]
    assert main(["generate", str(run), "--checkpoint", "step_3", "--max-new-tokens", "3", "--device", "cpu"]) == 0
    # resuming from step 3 retrains steps 4-6 and lands on the uninterrupted run's weights
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    train(data, copy, cfg(), TC.replace(max_steps=6), resume=True, from_checkpoint="step_3", log=lambda _: None)
    a, b = weights(run), weights(copy)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_eval_of_a_diverged_model_prints_strict_json(run: Path, tmp_path: Path, capsys) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    path = checkpoint.latest(copy) / checkpoint.MODEL
    w = load_file(str(path))
    w = {k: v * 1e4 if k.endswith(("head.weight", "wte.weight")) else v for k, v in w.items()}
    save_file(w, str(path))
    capsys.readouterr()
    assert main(["eval", str(copy), "--json", "--max-tokens", "64", "--batch-size", "1"]) == 0
    result = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"invalid JSON constant {c}"))
    assert result["val_loss"] > 700 and result["val_ppl"] is None and result["val_ppl_ci95"] == [None, None]


def test_bad_text_files_are_refused_by_name_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    binary = tmp_path / "program.txt"
    binary.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 4)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("Once upon a time\n\nA caf\u00e9 opened.\n".encode("latin-1"))
    latin_jsonl = tmp_path / "latin.jsonl"
    latin_jsonl.write_bytes(b'{"text": "ok"}\n' + '{"text": "caf\u00e9"}\n'.encode("latin-1"))
    for path, message in [
        (binary, "program.txt:1: NUL bytes; this is a binary file"),
        (latin, "latin.txt:3: not UTF-8 text (byte 0xe9 at column 6)"),
        (latin_jsonl, "latin.jsonl:2: not UTF-8 text"),
    ]:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            list(file_source([path])())
    assert main(["prepare", "--text", str(tmp_path), "--out", str(tmp_path / "out")]) == 1
    # the folder's .jsonl is read as a .jsonl (as when named directly): its bad line is named; the rest is no text
    err = capsys.readouterr().err
    assert "skipped: 2 not UTF-8 text" in err and "latin.jsonl:2: not UTF-8 text" in err
    latin_jsonl.unlink()
    assert main(["prepare", "--text", str(tmp_path), "--out", str(tmp_path / "out")]) == 1  # a folder of non-text
    assert "2 matching files, none UTF-8 text" in capsys.readouterr().err


def test_a_same_size_edit_is_not_mistaken_for_the_prepared_data(tmp_path: Path, capsys) -> None:
    text = tmp_path / "stories.txt"
    story = "Tom had a red ball. He played with it every day in the park with his dog.\n\n"
    text.write_text(story * 60)
    argv = ["prepare", "--text", str(text), "--vocab-size", "300", "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    text.write_text(story.replace("red", "tan") * 60)  # same size, other content
    assert main(argv) == 1
    assert "stories.txt changed)" in capsys.readouterr().err  # names the file that changed


def test_training_says_how_long_it_will_take_from_the_first_step(data: Path, tmp_path: Path) -> None:
    log: list[str] = []
    train(data, tmp_path / "r", cfg(), TC, log=log.append)
    assert log[0].startswith("step 1/6 took ") and "for the remaining 5 steps" in log[0]
    assert all("| ETA " in line for line in log if line.startswith("step 3/6 |"))


def test_resume_goes_on_with_the_recorded_data_and_refuses_other_data_unless_asked(
    run: Path, data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    monkeypatch.chdir(tmp_path)  # a data/builtin here, same tokenizer, other stories: never picked silently
    write_prepared(builtin_source(300), "data/builtin", {"dataset": "builtin", "stories": 300}, tokenizer=str(data))
    flags = ["--max-steps", "7", "--batch-size", "4", "--micro-batch-size", "4", "--seq-len", "32"]
    assert main(["train", "--out", str(copy), "--resume", *flags]) == 0
    assert str(data) in capsys.readouterr().out  # "resuming ... on <the run's data>"
    assert json.loads((copy / "run.json").read_text())["data"]["path"] == str(data)

    before = (copy / "run.json").read_text()
    assert main(["train", "--data", "data/builtin", "--out", str(copy), "--resume", "--max-steps", "8"]) == 1
    err = capsys.readouterr().err
    assert "holds other data" in err and "--new-data" in err and len(err.strip().splitlines()) == 1
    assert (copy / "run.json").read_text() == before
    assert main(["train", "--data", "data/builtin", "--out", str(copy), "--resume", "--new-data", *flags[2:],
                 "--max-steps", "8"]) == 0  # fmt: skip
    # recorded absolute (issue 45): the run's data resolves the same from any working directory
    assert json.loads((copy / "run.json").read_text())["data"]["path"] == str((tmp_path / "data/builtin").resolve())

    shutil.rmtree("data/builtin")  # the run's data is gone: say so, and what to pass
    assert main(["train", "--out", str(copy), "--resume", "--max-steps", "9"]) == 1
    err = capsys.readouterr().err
    assert "not a prepared data folder" in err and "--data FOLDER" in err and "moemla prepare" not in err


def test_a_resume_that_fails_to_load_leaves_run_json_as_it_was(run: Path, data: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    before = (copy / "run.json").read_text()
    (checkpoint.latest(copy) / checkpoint.OPTIMIZER).write_bytes(b"garbage")
    with pytest.raises(CheckpointError):
        train(data, copy, cfg(), TC.replace(max_steps=9, lr=1e-3), resume=True, log=lambda _: None)
    assert (copy / "run.json").read_text() == before


def test_one_story_is_refused_before_training_and_a_huge_one_is_prepared_in_pieces(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file of one short story is refused by counting stories (no tokenizer trained, no folder left); one of
    10.8 MB on one line (a log, a generated file) is cut at line ends, mid-line where one line is that long, into
    stories of at most 1M characters, recorded in the manifest, and nothing of its text is lost."""
    from moemla.data.sources import PIECE_CHARS

    short = tmp_path / "short.txt"
    short.write_text("the cat sat on the mat and " * 40)
    assert main(["prepare", "--text", str(short), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert "only 1 story" in err and "blank lines" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()
    text = tmp_path / "one-line.txt"
    line = "the cat sat on the mat and " * 400_000
    text.write_text(line + "\n")
    argv = ["prepare", "--text", str(text), "--vocab-size", "300", "--val-fraction", "0.3"]
    argv += ["--out", str(tmp_path / "out")]
    assert main(argv) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    pieces = manifest["long_stories"]["pieces"]
    assert manifest["long_stories"]["stories"] == 1
    assert len(line) / PIECE_CHARS / 1.1 < pieces <= len(line) / PIECE_CHARS + 1
    assert sum(manifest["splits"][s]["stories"] for s in ("train", "val")) == pieces
    from moemla.data.shards import PreparedData

    data = PreparedData.open(tmp_path / "out")
    tok = data.tokenizer()
    chars = sum(len(tok.decode(np.asarray(sh).tolist())) for s in ("train", "val") for sh in data.shards(s))
    assert chars == len(line.strip())  # every character is in a piece (the end-of-text tokens decode to nothing)


def test_eval_of_a_nan_model_exits_1_with_one_line(run: Path, tmp_path: Path, capsys) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    path = checkpoint.latest(copy) / checkpoint.MODEL
    save_file({k: torch.full_like(v, float("nan")) for k, v in load_file(str(path)).items()}, str(path))
    capsys.readouterr()
    assert main(["eval", str(copy), "--json", "--max-tokens", "64"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "NaN" in captured.err and "--checkpoint step_N" in captured.err
    assert len(captured.err.strip().splitlines()) == 1
