"""Dependencies point down (../shared/STYLE.md): a module imports only from its own layer or below,
and no two modules import each other, directly or around a loop."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "moemla"
# lowest first; a module's layer is that of its longest matching prefix ("moemla" alone: the package's __init__)
LAYERS = [
    ["moemla.config"],
    [
        "moemla",
        "moemla.model",
        "moemla.data",
        "moemla.accounting",
        "moemla.progress",
        "moemla.plots",
        "moemla.compiling",
        "moemla.device",
        "moemla.runs",
        "moemla.folders",
        "moemla.paper",
    ],
    ["moemla.eval", "moemla.inference"],  # read runs; never import train
    ["moemla.train"],  # creates runs and writes through them; evaluates with eval
    ["moemla.experiments", "moemla.demo", "moemla.export", "moemla.serve", "moemla.web"],
    ["moemla.cli", "moemla.__main__"],
]


def _module(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    # "moemla" names the package's __init__ alone: as a prefix it would place every module, and "add it" never fire
    matches = [
        (len(p), i)
        for i, layer in enumerate(LAYERS)
        for p in layer
        if module == p or (p != "moemla" and module.startswith(p + "."))
    ]
    assert matches, f"{module} has no layer in tests/test_imports.py; add it"
    return max(matches)[1]


def _imports() -> dict[str, set[str]]:
    """moemla module -> the moemla modules it imports (anywhere in the file, lazy imports included)."""
    modules = {_module(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("moemla"):
                for alias in node.names:  # `from moemla.train import checkpoint` imports the module
                    sub = f"{node.module}.{alias.name}"
                    found.add(sub if sub in modules else node.module)
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("moemla")}
        graph[name] = {m for m in found if m != name and m != "moemla"}
    return graph


GRAPH = _imports()


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_point_down(module: str) -> None:
    up = [m for m in GRAPH[module] if _layer(m) > _layer(module)]
    assert not up, f"{module} (layer {_layer(module)}) imports from a higher layer: {up}"


def test_no_import_cycles() -> None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(GRAPH.get(node, ())):
            if state.get(nxt) == 1:
                cycle = [*path[path.index(nxt) :], nxt] if nxt in path else [node, nxt]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for start in sorted(GRAPH):
        if start not in state:
            visit(start, [start])


def _package(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_no_two_packages_import_each_other() -> None:
    edges = {(_package(a), _package(b)) for a, found in GRAPH.items() for b in found if _package(a) != _package(b)}
    both = sorted((a, b) for a, b in edges if (b, a) in edges and a < b)
    assert not both, f"packages importing each other: {both}"


@pytest.mark.parametrize("wing", ["moemla.eval", "moemla.inference", "moemla.serve", "moemla.export", "moemla.runs"])
def test_wings_that_only_read_runs_never_import_train(wing: str) -> None:
    found = sorted(b for a, bs in GRAPH.items() if _package(a) == wing for b in bs if _package(b) == "moemla.train")
    assert not found, f"{wing} imports {found}: open runs with moemla.runs.RunFolder"
