"""Hostile input, round 3 (issue 45): no --overwrite deletes a run, a prepared data set or a user's file; every
folder is assembled beside its destination; every record file read back is checked in one place; the shipped
runner and `moemla web` fail in one line. docs/hostile-input.md lists every case tried and what each gets."""

import http.client
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from moemla.cli import main
from moemla.config import ModelConfig
from moemla.folders import FolderError, check_destination, kind
from moemla.inference.onnx import VERSION
from moemla.inference.sampling import truncate_prompt
from moemla.runs import RunFolder

onnx = pytest.importorskip("onnxruntime")


def snapshot(folder: Path) -> dict[str, int]:
    """Every file below folder with its size: what must survive a refused command."""
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def project(trained_debug_run: Path, tmp_path: Path) -> Path:
    """A copy of the trained debug run and its data, as a user's project: proj/run, proj/data."""
    root = tmp_path / "proj"
    shutil.copytree(trained_debug_run, root / "run")
    shutil.copytree(trained_debug_run.parent / "data", root / "data")
    meta = json.loads((root / "run" / "run.json").read_text())
    meta["data"]["path"] = str(root / "data")
    (root / "run" / "run.json").write_text(json.dumps(meta))
    return root


def refused(argv: list[str], capsys: pytest.CaptureFixture[str], *words: str) -> str:
    """The command exits non-zero with one line on stderr that holds every one of `words`."""
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, err
    return err


# 1. --overwrite never deletes a run, its parent, its checkpoints, prepared data or a user's files ----------------
@pytest.mark.parametrize("fmt", ["onnx", "web", "hf"])
@pytest.mark.parametrize("target", ["run", "parent", "checkpoints", "data"])
def test_export_overwrite_never_replaces_a_run_or_data(
    project: Path, fmt: str, target: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run = project / "run"
    out = {"run": run, "parent": project, "checkpoints": run / "checkpoints", "data": project / "data"}[target]
    before = snapshot(project)
    refused(["export", str(run), str(out), "--format", fmt, "--overwrite"], capsys, str(out))
    assert snapshot(project) == before
    assert not [p for p in project.parent.iterdir() if p.name.startswith(".")]  # no staging folder left behind


def test_overwrite_replaces_only_its_own_folder_and_only_its_own_files(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, out = project / "run", project.parent / "export"
    assert main(["export", str(run), str(out), "--format", "onnx"]) == 0
    assert kind(out) == "onnx"
    refused(["export", str(run), str(out), "--format", "onnx"], capsys, "--overwrite")  # not without asking
    (out / "notes.txt").write_text("mine")
    refused(["export", str(run), str(out), "--format", "onnx", "--overwrite"], capsys, "notes.txt", "delete them")
    (out / "notes.txt").unlink()
    assert main(["export", str(run), str(out), "--format", "hf", "--overwrite"]) == 0  # an export replaces an export
    assert kind(out) == "hf" and not (out / "model.onnx").exists()
    (out / "model-00002.safetensors").write_bytes(b"fine-tuned since")  # a user's later work in the folder
    refused(["export", str(run), str(out), "--overwrite"], capsys, "model-00002.safetensors")
    user = project.parent / "mine"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    refused(["export", str(run), str(user), "--format", "onnx", "--overwrite"], capsys, "was not written by moemla")
    assert (user / "thesis.tex").read_text() == "years of work"


def test_prepare_train_import_and_reproduce_never_write_into_what_they_do_not_own(
    project: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, data = project / "run", project / "data"
    before = snapshot(project)
    prep = ["prepare", "--stories", "200", "--vocab-size", "300"]
    refused([*prep, "--out", str(run), "--overwrite"], capsys, "is a run")
    train = ["train", "--preset", "debug", "--max-steps", "1", "--batch-size", "2", "--seq-len", "32"]
    refused([*train, "--data", str(data), "--out", str(data)], capsys, "is", str(data))
    refused(["reproduce", "table2", "--preset", "debug", "--steps", "1", "--data", str(data), "--out", str(run)],
            capsys, "is a run")  # fmt: skip
    hf = tmp_path / "hf"
    assert main(["export", str(run), str(hf)]) == 0
    refused(["import", str(hf), str(run), "--overwrite"], capsys, "is a run")
    assert snapshot(project) == before
    user = tmp_path / "notes"
    user.mkdir()
    (user / "todo.md").write_text("mine")
    refused([*prep, "--out", str(user), "--overwrite"], capsys, "was not written by moemla")
    refused([*train, "--data", str(data), "--out", str(user)], capsys, "a folder of other files")
    # its own kind: an imported run is replaced by import, prepared data by prepare (never a file put beside it)
    assert main(["import", str(hf), str(tmp_path / "imported")]) == 0
    assert main(["import", str(hf), str(tmp_path / "imported"), "--overwrite"]) == 0
    mine = tmp_path / "mydata"
    assert main([*prep, "--out", str(mine)]) == 0
    (mine / "readme.txt").write_text("mine")
    refused([*prep, "--vocab-size", "280", "--out", str(mine), "--overwrite"], capsys, "readme.txt")
    (mine / "readme.txt").unlink()
    assert main([*prep, "--vocab-size", "280", "--out", str(mine), "--overwrite"]) == 0
    assert json.loads((mine / "manifest.json").read_text())["request"]["vocab_size"] == 280
    assert kind(mine) == "data"


def test_check_destination_rules(tmp_path: Path) -> None:
    """The rule itself: new and empty folders always; a file, a source, a folder holding a run never."""
    assert check_destination(tmp_path / "new", "export") == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    assert check_destination(tmp_path / "empty", "export", overwrite=True) == tmp_path / "empty"
    (tmp_path / "file").write_text("x")
    with pytest.raises(FolderError, match="is a file"):
        check_destination(tmp_path / "file", "export")
    src = tmp_path / "a" / "src"
    src.mkdir(parents=True)
    with pytest.raises(FolderError, match="contains"):
        check_destination(tmp_path / "a", "prepare", sources=(src,), overwrite=True)
    (src / "run.json").write_text(json.dumps({"model": {}, "train": {}, "data": {}}))
    with pytest.raises(FolderError, match=r"contains .*which is a run"):
        check_destination(tmp_path / "a", "export", overwrite=True)


# 2. a folder that cannot be written is one line ---------------------------------------------------------------
def _read_only_parent(tmp_path: Path) -> Path:
    if os.geteuid() != 0:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    for candidate in (Path("/sys"), Path("/proc/sys")):  # root ignores permissions: a read-only mount
        try:
            (candidate / "moemla-write-test").mkdir()
        except OSError:
            return candidate
        (candidate / "moemla-write-test").rmdir()
    pytest.skip("no folder here refuses writes to root")


@pytest.mark.parametrize("fmt", ["onnx", "web", "hf"])
def test_a_read_only_destination_is_one_line(
    project: Path, tmp_path: Path, fmt: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _read_only_parent(tmp_path) / "export"
    refused(["export", str(project / "run"), str(out), "--format", fmt], capsys, "not writable", "choose a folder")


# 3. an interrupted export leaves what was there; the perplexity is in the folder or said to be missing -----------
def test_ctrl_c_late_in_an_int8_export_leaves_the_old_state(
    project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import moemla.export.onnx as export_onnx

    run, out = project / "run", project.parent / "int8"

    def interrupted(*args: object) -> dict:
        raise KeyboardInterrupt

    monkeypatch.setattr(export_onnx, "quantized_perplexity", interrupted)
    assert main(["export", str(run), str(out), "--format", "onnx", "--quantize", "int8"]) == 130
    assert not out.exists() and not [p for p in project.parent.iterdir() if p.name.startswith(".")]
    monkeypatch.undo()
    assert main(["export", str(run), str(out), "--format", "onnx", "--quantize", "int8"]) == 0  # no --overwrite
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["validation_perplexity"] > 1 and manifest["fp32_validation_perplexity"] > 1
    before = snapshot(out)
    monkeypatch.setattr(export_onnx, "quantized_perplexity", interrupted)
    assert main(["export", str(run), str(out), "--format", "onnx", "--quantize", "int8", "--overwrite"]) == 130
    assert snapshot(out) == before  # the old export is whole
    monkeypatch.undo()
    shutil.rmtree(project / "data")  # the run's data is gone: the manifest says the perplexity was not measured
    assert main(["export", str(run), str(out), "--format", "onnx", "--quantize", "int8", "--overwrite"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["validation_perplexity"] is None and "not on disk" in manifest["perplexity_not_measured"]
    capsys.readouterr()


# 4. every record file read back is checked in one place: one line naming the file, the key and the fix ------------
@pytest.fixture(scope="module")
def onnx_export(trained_debug_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hostile") / "onnx"
    assert main(["export", str(trained_debug_run), str(out), "--format", "onnx"]) == 0
    return out


@pytest.mark.parametrize("key", ["cache", "config", "config.max_seq_len", "files"])
@pytest.mark.parametrize("command", ["generate", "eval", "serve"])
def test_a_manifest_without_a_key_is_one_line(
    onnx_export: Path, tmp_path: Path, key: str, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "damaged"
    shutil.copytree(onnx_export, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    parent, _, leaf = key.rpartition(".")
    del (manifest[parent] if parent else manifest)[leaf]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    argv = {"generate": ["--prompt", "Tom"], "eval": [], "serve": ["--port", "0"]}[command]
    refused([command, str(folder), *argv], capsys, "manifest.json", repr(key), "export the model again")


@pytest.mark.parametrize("damage", ["no key", "not json", "wrong type"])
def test_run_json_and_the_data_manifest_are_checked_in_one_place(
    project: Path, damage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    for path, key in [(project / "run" / "run.json", "model"), (project / "data" / "manifest.json", "splits")]:
        saved = path.read_text()
        record = json.loads(saved)
        text = {"no key": json.dumps({k: v for k, v in record.items() if k != key}), "not json": "{trunc",
                "wrong type": json.dumps({**record, key: [1]})}[damage]  # fmt: skip
        path.write_text(text)
        what = {"no key": repr(key), "not json": "not valid JSON", "wrong type": "not an object"}[damage]
        refused(["eval", str(project / "run"), "--data", str(project / "data")], capsys, str(path), what)
        path.write_text(saved)


# 5. the shipped runner: one line for a damaged folder, the one truncation rule with a notice, counts checked -------
def _runner(folder: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(folder / "run_onnx.py"), *args], capture_output=True, text=True,
                          timeout=120)  # fmt: skip


@pytest.mark.parametrize("damage", ["model missing", "bad json", "no tokenizer", "no manifest", "no cache key"])
def test_the_runner_on_a_damaged_folder_is_one_line(onnx_export: Path, tmp_path: Path, damage: str) -> None:
    folder = tmp_path / "damaged"
    shutil.copytree(onnx_export, folder)
    if damage == "model missing":
        (folder / "model.onnx").unlink()
    elif damage == "bad json":
        (folder / "manifest.json").write_text("{")
    elif damage == "no tokenizer":
        (folder / "tokenizer.json").unlink()
    elif damage == "no manifest":
        (folder / "manifest.json").unlink()
    else:
        manifest = json.loads((folder / "manifest.json").read_text())
        del manifest["cache"]
        (folder / "manifest.json").write_text(json.dumps(manifest))
    done = _runner(folder, "Once upon a time", "--max-new-tokens", "3")
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().count("\n") == 0 and "export the model again" in done.stderr, done.stderr


def test_the_runner_cuts_a_long_prompt_by_the_one_rule_and_refuses_negative_counts(onnx_export: Path) -> None:
    context = json.loads((onnx_export / "manifest.json").read_text())["config"]["max_seq_len"]
    done = _runner(onnx_export, "Tom went home. " * context, "--max-new-tokens", "20", "--temperature", "0")
    assert done.returncode == 0, done.stderr
    assert "were cut to its last" in done.stderr and "new tokens fit" in done.stderr
    done = _runner(onnx_export, "Tom", "--max-new-tokens", "-5")
    assert done.returncode == 2 and "--max-new-tokens must be at least 0" in done.stderr
    # the runner restates moemla's rule: the two agree on every length, context and budget
    spec = __import__("importlib.util").util.spec_from_file_location("run_onnx", onnx_export / "run_onnx.py")
    runner = __import__("importlib.util").util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    for n in (1, 5, 31, 32, 33, 64, 200):
        for context in (8, 32, 64):
            for new in (0, 1, 16, 100):
                ids = list(range(n))
                assert runner.truncate_prompt(ids, context, new) == truncate_prompt(ids, context, new)


# 6. `moemla web`: requests that map to no file get a 4xx, the server keeps serving; a network host is announced ----
def fake_web_folder(folder: Path) -> Path:
    """The smallest folder `moemla web` accepts: a manifest listing its one page file."""
    folder.mkdir()
    (folder / "index.html").write_text("<p>page</p>")
    (folder / "sub").mkdir()
    (folder / "sub" / "a.js").write_text("//")
    manifest = {"format": "moemla-onnx", "version": VERSION, "config": ModelConfig.from_preset("debug").to_dict(),
                "cache": [], "files": {"index.html": 11, "sub/a.js": 2}, "web": {"page": ["index.html"],
                "libraries": {}}}  # fmt: skip
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_the_web_server_answers_requests_for_no_file_with_4xx_and_keeps_serving(tmp_path: Path) -> None:
    from moemla.web.server import make_server

    server = make_server(fake_web_folder(tmp_path / "web"), port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        for path, status in [("/manifest.json%00.html", 400), ("/sub%2Fa.js", 400), ("/sub%5ca.js", 400),
                             ("/..%2f..%2fetc/passwd", 400), ("/sub/", 404), ("/sub", 404), ("/nothing", 404),
                             ("/", 200), ("/sub/a.js", 200)]:  # fmt: skip
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", path)
            assert conn.getresponse().status == status, path
            conn.close()
    finally:
        server.shutdown()
        server.server_close()


def test_moemla_web_names_the_fix_for_a_run_a_bad_host_and_a_network_host(
    trained_debug_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from moemla.web.server import network_notice

    refused(["web", str(trained_debug_run)], capsys, "--format web")
    folder = fake_web_folder(tmp_path / "web")
    err = refused(["web", str(folder), "--host", "no-such-host.invalid", "--port", "0"], capsys, "--host")
    assert "--port" not in err
    assert network_notice("127.0.0.1") is None and network_notice("localhost") is None
    assert "reachable from the network" in network_notice("0.0.0.0")


def test_moemla_web_on_every_interface_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import http.server

    def stop(self: object) -> None:
        raise KeyboardInterrupt  # Ctrl-C at once: only what the command printed before serving matters

    monkeypatch.setattr(http.server.ThreadingHTTPServer, "serve_forever", stop)
    assert main(["web", str(fake_web_folder(tmp_path / "web")), "--host", "0.0.0.0", "--port", "0"]) == 0
    assert "now reachable from the network" in capsys.readouterr().err
    assert main(["web", str(tmp_path / "web"), "--port", "0"]) == 0
    assert "network" not in capsys.readouterr().err


# 9. paths recorded in run.json resolve the same from any working directory --------------------------------------
def test_a_runs_data_resolves_from_any_working_directory(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run = project / "run"
    meta = json.loads((run / "run.json").read_text())
    assert Path(json.loads((RunFolder(run).path / "run.json").read_text())["data"]["path"]).is_absolute()
    meta["data"]["path"] = "data"  # as runs recorded it before: relative to where training ran (proj/)
    (run / "run.json").write_text(json.dumps(meta))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert RunFolder("../proj/run").data_path == (project / "data").resolve()
    assert main(["eval", "../proj/run", "--max-tokens", "200", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] > 0
    assert main(["export", "../proj/run", "int8", "--format", "onnx", "--quantize", "int8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["validation_perplexity"] > 1


def test_new_runs_record_their_data_folder_absolute(trained_debug_run: Path) -> None:
    assert Path(RunFolder(trained_debug_run).meta["data"]["path"]).is_absolute()


# the smaller items ---------------------------------------------------------------------------------------------
def test_eval_on_a_tiny_text_names_no_flag_eval_lacks(project: Path, tmp_path: Path, capsys) -> None:
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("Tom.")
    err = refused(["eval", str(project / "run"), "--text", str(tiny)], capsys, "give a longer text")
    assert "--seq-len" not in err


def test_eval_batch_size_0_is_refused_for_a_run_and_an_onnx_folder(project: Path, onnx_export: Path, capsys) -> None:
    for folder in (project / "run", onnx_export):
        for flag in ("--batch-size", "--max-tokens"):
            with pytest.raises(SystemExit):
                main(["eval", str(folder), flag, "0"])
            assert f"{flag}: must be at least 1, got 0" in capsys.readouterr().err


def test_exporting_nan_weights_names_the_checkpoint(project: Path, tmp_path: Path, capsys) -> None:
    import torch

    from moemla.runs import checkpoint

    run = RunFolder(project / "run")
    model = run.load_model()
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    checkpoint.save(run.path, 99, model, {}, {"step": 99}, keep=5)
    for fmt in ("onnx", "hf"):
        refused(["export", str(run.path), str(tmp_path / fmt), "--format", fmt], capsys, "step_00000099", "NaN",
                "--checkpoint")  # fmt: skip


EXPORT_FLAGS = [("eval", ["--checkpoint", "step_1"]), ("eval", ["--device", "cuda"]),
                ("generate", ["--quantize", "int8"]), ("generate", ["--compile"])]  # fmt: skip


@pytest.mark.parametrize(("command", "flag"), EXPORT_FLAGS)
def test_flags_an_export_cannot_honour_are_refused_by_one_rule(
    onnx_export: Path, command: str, flag: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 42, item 2: one refusal (onnx.engine.refuse_export_flags) for generate, serve and eval."""
    refused([command, str(onnx_export), *flag], capsys, "is an ONNX export", f"drop {flag[0]}")
