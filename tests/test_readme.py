import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
GUIDES = sorted((ROOT / "docs").glob("*.md"))  # the guides the README points to
DOCS = [README, *GUIDES]


def _text() -> str:
    return "\n".join(p.read_text() for p in DOCS)


def test_readme_python_example_runs() -> None:
    blocks = re.findall(r"```python\n(.*?)```", _text(), flags=re.S)
    assert blocks, "README lost its Python example"
    for code in blocks:
        exec(compile(code, str(README), "exec"), {})


def test_every_moemla_command_in_the_readme_parses_as_written() -> None:
    """Each `moemla ...` line of the shell blocks of README.md and docs/ is accepted by the parser (flags, choices,
    values)."""
    import shlex

    from moemla.cli import build_parser

    commands = []
    for block in re.findall(r"```bash\n(.*?)```", _text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if "moemla " in line and line.lstrip().startswith(("moemla ", "pip install")):
                argv = shlex.split(line[line.index("moemla ") :], comments=True)
                if argv[1] != "lm-eval":  # lm-eval's own flags are lm-eval's to check
                    commands.append(argv)
    assert len(commands) > 50, "README and docs/ lost their command examples"
    for argv in commands:
        try:
            build_parser().parse_args(argv[1:])
        except SystemExit:
            raise AssertionError(f"README's `{shlex.join(argv)}` does not parse") from None


def test_readme_run_folder_example_runs(trained_debug_run, tmp_path, monkeypatch, capsys) -> None:
    import shutil

    section = (ROOT / "docs" / "training.md").read_text().split("a run folder is one object", 1)[1]
    code = re.search(r"```py\n(.*?)```", section, flags=re.S).group(1)
    shutil.copytree(trained_debug_run, tmp_path / "runs" / "demo" / "moe-mla-rope")
    monkeypatch.chdir(tmp_path)
    scope: dict[str, object] = {}
    exec(compile(code, str(README), "exec"), scope)
    assert scope["model"].cfg == scope["run"].model_config and "ModelConfig(" in capsys.readouterr().out


def test_the_readme_is_a_front_page_and_every_link_resolves() -> None:
    """README.md fits on a few screens (the guides live in docs/), and every relative link of README.md and docs/
    names a file that exists (a moved guide leaves no dead link)."""
    assert len(README.read_text().splitlines()) <= 250
    assert {p.name for p in GUIDES} >= {"data.md", "training.md", "evaluation.md", "generation.md", "deployment.md",
                                        "interop.md", "reproduction.md"}  # fmt: skip
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if not target.startswith(("http://", "https://", "mailto:")):
                assert (doc.parent / target).exists(), f"{doc.name} links to {target}, which does not exist"
