import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_example_runs() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README lost its Python example"
    for code in blocks:
        exec(compile(code, str(README), "exec"), {})


def test_every_moemla_command_in_the_readme_parses_as_written() -> None:
    """Each `moemla ...` line of README's shell blocks is accepted by the parser (flags, choices, values)."""
    import shlex

    from moemla.cli import build_parser

    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if "moemla " in line and line.lstrip().startswith(("moemla ", "pip install")):
                argv = shlex.split(line[line.index("moemla ") :], comments=True)
                if argv[1] != "lm-eval":  # lm-eval's own flags are lm-eval's to check
                    commands.append(argv)
    assert len(commands) > 20, "README lost its command examples"
    for argv in commands:
        try:
            build_parser().parse_args(argv[1:])
        except SystemExit:
            raise AssertionError(f"README's `{shlex.join(argv)}` does not parse") from None


def test_readme_run_folder_example_runs(trained_debug_run, tmp_path, monkeypatch, capsys) -> None:
    import shutil

    section = README.read_text().split("a run folder is one object", 1)[1]
    code = re.search(r"```py\n(.*?)```", section, flags=re.S).group(1)
    shutil.copytree(trained_debug_run, tmp_path / "runs" / "demo" / "moe-mla-rope")
    monkeypatch.chdir(tmp_path)
    scope: dict[str, object] = {}
    exec(compile(code, str(README), "exec"), scope)
    assert scope["model"].cfg == scope["run"].model_config and "ModelConfig(" in capsys.readouterr().out
