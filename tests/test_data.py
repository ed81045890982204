import json
from pathlib import Path

import numpy as np
import pytest
import torch

from moemla.data import corpus
from moemla.data.shards import PreparedData, is_val, train_batch, write_prepared
from moemla.data.sources import DataError, builtin_source, file_source
from moemla.data.tokenizer import load_tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not (SHARED / "gpt2" / "tokenizer.json").is_file(), reason="../shared/data absent")


def _prepare(tmp_path: Path, stories: int = 300, **kw: object) -> Path:
    out = tmp_path / "data"
    write_prepared(builtin_source(stories), out, {"dataset": "builtin", "stories": stories}, vocab_size=400, **kw)
    return out


def test_corpus_is_deterministic_and_story_lengths_are_in_range() -> None:
    assert corpus.story(0, 5) == corpus.story(0, 5)
    assert corpus.story(0, 5) != corpus.story(1, 5)
    lengths = [len(s.split()) for s in corpus.stories(0, 500)]
    assert min(lengths) >= corpus.MIN_WORDS and max(lengths) <= corpus.MAX_WORDS


def test_corpus_has_long_range_references() -> None:
    # the hero's name and treasured object, introduced in the first two sentences, recur in the last third
    hits = 0
    for text in corpus.stories(3, 300):
        name = text.replace(" called ", " named ").split(" named ")[1].split()[0].strip(".")
        thing = text.split(" had ", 1)[1].split(".")[0].split(" ", 1)[1]  # "a blue kite" -> "blue kite"
        tail = text[2 * len(text) // 3 :]
        hits += name in tail and thing in tail
    assert hits >= 0.9 * 300


def test_corpus_stories_never_repeat_so_validation_measures_generalization() -> None:
    """Held-out stories are new stories, not copies of training ones, over a vocabulary of 1000+ words."""
    stories = list(corpus.stories(0, 3000))
    assert len(set(stories)) == len(stories)
    val = [s for i, s in enumerate(stories) if is_val(i, 0.05)]
    assert val and not set(val) & {s for i, s in enumerate(stories) if not is_val(i, 0.05)}
    words = {w.strip('.,!?":;').lower() for s in stories for w in s.split()}
    assert len(words) > 1000


def test_text_files_split_by_marker_or_blank_lines(tmp_path: Path) -> None:
    marked = tmp_path / "a.txt"
    marked.write_text("One story.\nSecond line.\n<|endoftext|>\nTwo story.\n<|endoftext|>\n")
    blank = tmp_path / "b.txt"
    blank.write_text("First.\n\nSecond one\nstill second.\n\n\nThird.")
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text(json.dumps({"text": "From json."}) + "\n\n" + json.dumps({"text": "Again."}) + "\n")
    assert list(file_source([marked])()) == ["One story.\nSecond line.", "Two story."]
    assert list(file_source([blank])()) == ["First.", "Second one\nstill second.", "Third."]
    assert list(file_source([jsonl, marked])())[:3] == ["From json.", "Again.", "One story.\nSecond line."]


def test_parquet_source(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"text": ["A.", "B."]}), tmp_path / "x.parquet")
    assert list(file_source([tmp_path / "x.parquet"])()) == ["A.", "B."]
    # with the sha256 recorded when it was scanned: a file changed since stops the read (pyarrow reads it whole,
    # so it is hashed again right after)
    from moemla.data.prepare import file_identity

    path = tmp_path / "x.parquet"
    recorded = {path: file_identity(path)["sha256"]}
    assert list(file_source([path], recorded)()) == ["A.", "B."]
    pq.write_table(pa.table({"text": ["C."]}), path)
    with pytest.raises(DataError, match="changed while it was being prepared"):
        list(file_source([path], recorded)())


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.txt", None, "not found"),
        ("empty.txt", "", "empty"),
        ("bad.csv", "a,b", "unsupported file type"),
        ("bad.jsonl", '{"body": "x"}\n', "'text' field"),
    ],
)
def test_bad_input_files_are_named(tmp_path: Path, name: str, content: str | None, message: str) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=message):
        list(file_source([path])())


def test_prepare_holds_out_whole_stories_and_checks_out(tmp_path: Path) -> None:
    out = _prepare(tmp_path)
    data = PreparedData.open(out)
    data.verify()
    splits = data.manifest["splits"]
    assert splits["train"]["stories"] + splits["val"]["stories"] == 300
    assert splits["val"]["stories"] == sum(is_val(i, 0.05) for i in range(300))
    eot = data.manifest["tokenizer"]["eot_id"]
    for split in ("train", "val"):
        tokens = np.concatenate(data.shards(split))
        assert tokens.dtype == np.uint16 and len(tokens) == splits[split]["tokens"]
        assert (tokens == eot).sum() == splits[split]["stories"] and tokens[-1] == eot  # whole stories only
    val_text = data.tokenizer().decode(np.concatenate(data.shards("val")).tolist())
    assert corpus.story(0, next(i for i in range(300) if is_val(i, 0.05))) in val_text


def test_prepared_folder_is_reused_and_never_mixes_tokenizers(tmp_path: Path) -> None:
    out = _prepare(tmp_path)
    stamp = (out / "train_000.bin").stat().st_mtime_ns
    _prepare(tmp_path)  # same request: reused as is
    assert (out / "train_000.bin").stat().st_mtime_ns == stamp
    with pytest.raises(DataError, match="tokenizer: 'bpe' then, 'gpt2' now"):
        write_prepared(builtin_source(300), out, {"dataset": "builtin", "stories": 300}, tokenizer="gpt2")


def test_prepare_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="too few to hold out"):
        _prepare(tmp_path, stories=3)
    assert not (tmp_path / "data" / "manifest.json").exists()
    with pytest.raises(DataError, match="not a prepared data folder"):
        PreparedData.open(tmp_path / "data")
    with pytest.raises(DataError, match="unknown tokenizer"):
        load_tokenizer("llama")


def test_truncated_shard_is_detected(tmp_path: Path) -> None:
    out = _prepare(tmp_path)
    shard = out / "train_000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(DataError, match="truncated"):
        PreparedData.open(out)


def test_train_batches_are_pure_and_split_across_processes(tmp_path: Path) -> None:
    shards = PreparedData.open(_prepare(tmp_path)).shards("train")
    x, y = train_batch(shards, 32, seed=1, step=7, batch=8, rows=slice(0, 8))
    x2, _ = train_batch(shards, 32, seed=1, step=7, batch=8, rows=slice(0, 8))
    halves = [train_batch(shards, 32, seed=1, step=7, batch=8, rows=slice(i, i + 4))[0] for i in (0, 4)]
    assert x.equal(x2) and x.equal(torch.cat(halves))
    assert x[:, 1:].equal(y[:, :-1])
    assert not x.equal(train_batch(shards, 32, seed=1, step=8, batch=8, rows=slice(0, 8))[0])


@needs_shared
def test_gpt2_tokenizer_and_tinystories_sample(tmp_path: Path) -> None:
    tok = load_tokenizer(str(SHARED / "gpt2" / "tokenizer.json"))
    assert tok.get_vocab_size() == 50257 and tok.encode("Once upon a time").ids == [7454, 2402, 257, 640]
    source = file_source([SHARED / "tinystories-train-sample.txt"])
    m = write_prepared(source, tmp_path / "ts", {"dataset": "text"}, tokenizer=str(SHARED / "gpt2" / "tokenizer.json"))
    assert m["splits"]["train"]["stories"] + m["splits"]["val"]["stories"] == 1728
    assert m["tokenizer"]["eot_id"] == 50256 and m["dtype"] == "uint16"


def test_tinystories_without_datasets_says_how_to_get_it() -> None:
    try:
        import datasets  # noqa: F401
    except ImportError:
        from moemla.data.sources import tinystories_source

        with pytest.raises(DataError, match=r"pip install datasets.*--text"):
            tinystories_source()
    else:
        pytest.skip("datasets is installed")


def test_a_folder_or_glob_prepares_one_document_per_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Source code as a second domain (issue 23): every matching UTF-8 file is one document; binaries are skipped
    and counted; --include/--exclude filter on the path below the folder or the file name."""
    from moemla.cli import main

    tree = tmp_path / "lib"
    for i in range(40):
        sub = tree / ("test" if i % 10 == 0 else f"pkg{i % 3}")
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"mod{i}.py").write_text(f"def f{i}(x):\n    return x * {i}\n\n\nclass C{i}:\n    pass\n" * 3)
    (tree / "pkg0" / "data.bin").write_bytes(b"\x00\x01binary")
    (tree / "README.txt").write_text("Not code.\n")
    out = tmp_path / "data"
    argv = ["prepare", "--text", str(tree), "--include", "*.py", "--exclude", "test/*", "--vocab-size", "300",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "36 documents" in captured.err
    manifest = json.loads((out / "manifest.json").read_text())
    splits = manifest["splits"]
    assert splits["train"]["stories"] + splits["val"]["stories"] == 36
    assert len(manifest["request"]["source"]["documents"]) == 36
    assert main(["prepare", "--text", str(tree), "--vocab-size", "300", "--out", str(tmp_path / "all")]) == 0
    assert "41 documents (skipped: 1 not UTF-8 text)" in capsys.readouterr().err  # 40 .py + README
    pattern = str(tree / "**" / "mod1*.py")  # mod1, mod10..mod19: a recursive glob, quoted in a shell
    assert main(["prepare", "--text", pattern, "--vocab-size", "300", "--val-fraction", "0.3",
                 "--out", str(tmp_path / "glob")]) == 0  # fmt: skip
    assert "11 documents" in capsys.readouterr().err


def _tree(root: Path, n: int = 40) -> Path:
    for i in range(n):
        (root / f"part{i % 4}").mkdir(parents=True, exist_ok=True)
        (root / f"part{i % 4}" / f"note{i}.txt").write_text(f"Note {i}: the fox jumped over {i} dogs.\n" * 5)
    return root


def test_folder_and_glob_read_what_the_user_means(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Issue 38: symlinked folders are never followed (a link to `.` once made 20 files 820 documents, two hung
    the command), the folder and glob forms find the same files, .git is skipped, a folder's .jsonl is read as
    stories, the output folder inside the input is not its input, and --out on a file is one line."""
    from moemla.cli import main
    from moemla.data.documents import find_documents

    tree = _tree(tmp_path / "notes")
    (tree / "part0" / "self").symlink_to("..")  # two loops
    (tree / "part1" / "up").symlink_to("../..")
    (tree / ".git").mkdir()
    (tree / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    by_folder = find_documents(str(tree))
    by_glob = find_documents(str(tree / "**" / "*"))
    assert len(by_folder.documents) == 40 and list(by_folder.documents) == list(by_glob.documents)
    assert find_documents(str(tree / "part0" / "*.txt")).documents.keys() == {
        p for p in by_folder.documents if p.parent.name == "part0"
    }
    records = [json.dumps({"text": f"Story {i} of the fox."}) for i in range(8)]
    (tree / "stories.jsonl").write_text("\n".join(records) + "\n")
    out = tree / "prepared"  # inside the input folder
    argv = ["prepare", "--text", str(tree), "--vocab-size", "300", "--out", str(out)]
    assert main(argv) == 0
    assert "40 documents and 1 .jsonl/.parquet files" in capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["train"]["stories"] + manifest["splits"]["val"]["stories"] == 48  # 40 + 8 records
    tok = load_tokenizer(str(out / "tokenizer.json"))
    text = tok.decode(np.fromfile(out / "train_000.bin", dtype=np.uint16).tolist())
    assert "Story 1 of the fox." in text and '{"text"' not in text
    assert main(argv) == 0  # the same command again reuses: its own output is not its input
    assert main([*argv[:-1], str(tree / "part0" / "note0.txt")]) == 1
    assert "is a file; give a folder" in capsys.readouterr().err


def test_unreadable_and_changing_files_are_counted_or_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from moemla.data.documents import document_source, find_documents

    tree = _tree(tmp_path / "notes")
    broken = tree / "part2" / "note2.txt"
    real = Path.open

    def opener(self: Path, *args: object, **kw: object) -> object:
        if self == broken:
            raise OSError(5, "Input/output error")
        return real(self, *args, **kw)

    monkeypatch.setattr(Path, "open", opener)
    found = find_documents(str(tree))
    assert found.unreadable == 1 and len(found.documents) == 39 and "1 unreadable" in found.skipped()
    monkeypatch.undo()
    found = find_documents(str(tree))
    changed = tree / "part3" / "note3.txt"
    changed.write_text("edited while preparing\n")
    with pytest.raises(DataError, match=r"note3\.txt changed while it was being prepared"):
        list(document_source(found.documents)())
    # a file named directly (.txt, .jsonl): its bytes are hashed as they are read and checked against the record
    from moemla.data.prepare import file_identity

    recorded = file_identity(changed)["sha256"]
    assert list(file_source([changed], {changed: recorded})()) == ["edited while preparing"]
    changed.write_text("edited again\n")
    with pytest.raises(DataError, match="changed while it was being prepared"):
        list(file_source([changed], {changed: recorded})())


def test_a_refusal_to_reuse_names_a_few_changed_files_and_the_tokenizer_by_content(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from moemla.cli import main

    tree = _tree(tmp_path / "notes")
    out = tmp_path / "data"
    argv = ["prepare", "--text", str(tree), "--vocab-size", "300", "--out", str(out)]
    assert main(argv) == 0
    for i in range(5):
        (tree / f"part{i % 4}" / f"note{i}.txt").write_text(f"changed {i}\n")
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "note0.txt changed" in err and "and 2 more files" in err and len(err) < 800
    # a tokenizer by path: a replaced file is another tokenizer, not the one recorded under that name
    (tmp_path / "tok.json").write_bytes((out / "tokenizer.json").read_bytes())
    argv = ["prepare", "--text", str(tree), "--tokenizer", str(tmp_path / "tok.json"), "--out", str(tmp_path / "d2")]
    assert main(argv) == 0
    assert main(["prepare", "--stories", "300", "--vocab-size", "280", "--out", str(tmp_path / "d3")]) == 0
    (tmp_path / "tok.json").write_bytes((tmp_path / "d3" / "tokenizer.json").read_bytes())
    capsys.readouterr()
    assert main(argv) == 1
    assert "tokenizer_sha256:" in capsys.readouterr().err
