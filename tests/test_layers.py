"""The house's layers hold: each package imports only packages of lower layers, and no module imports
itself back through others. Imports inside function bodies count too: a lazy import is still a
dependency, only a later one. To add a package, give it a place in LAYERS."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

# Lowest first. A package may import packages of layers strictly below its own (and its own modules).
LAYERS = [
    ("common",),  # errors, flags, files of a run, DDP set-up, LR schedule: no project imports
    ("rewards",),  # the numeric reward, TRL-style reward functions
    ("data",),  # GSM8K, synthetic problems, user tables, the prompt format
    ("models",),  # loading, LoRA, the tiny model, log-prob kernels
    ("sampling",),  # the rollout engine
    ("eval",),  # held-out accuracy
    ("training",),  # what both trainers share around their loops
    ("sft", "grpo", "viz"),  # the two trainers; plots of their logs
    ("benchmarks",),
]
CLIS = ("train", "train_sft", "train_grpo", "visualize_logs", "dev", "scripts")  # may import any package
LAYER = {package: i for i, names in enumerate(LAYERS) for package in names}


def modules() -> dict[str, Path]:
    """Every project module outside tests, by dotted name (a package's __init__ by the package's name)."""
    found = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in (".venv", "tests") or rel.parts[0].startswith("."):
            continue
        parts = rel.with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports_of(path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules `path` imports, at the top or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from pkg import mod` imports the module pkg.mod; `from mod import name`, the module mod
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                     for a in node.names]
        else:
            continue
        out |= {n for n in names if n in known}
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(path, known) - {name} for name, path in known.items()}


def test_every_package_has_a_layer():
    packages = {m.split(".")[0] for m in modules()} - set(CLIS)
    assert packages <= set(LAYER), f"give {sorted(packages - set(LAYER))} a place in LAYERS"


def layer_violations(edges: dict[str, set[str]]) -> list[str]:
    wrong = []
    for module, targets in edges.items():
        package = module.split(".")[0]
        if package in CLIS:
            continue
        for target in targets:
            other = target.split(".")[0]
            if other != package and (other in CLIS or LAYER[other] >= LAYER[package]):
                wrong.append(f"{module} imports {target}")
    return sorted(wrong)


def cycles(edges: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    found = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                found.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    return found


def test_packages_import_only_lower_layers():
    assert not layer_violations(graph()), "\n".join(layer_violations(graph()))


def test_no_import_cycles():
    assert not cycles(graph()), "\n".join(cycles(graph()))


def test_the_checks_find_an_upward_import_and_a_cycle(tmp_path):
    """The checker itself, on a made-up tree: an import inside a function body is seen, and both an
    upward import and a cycle are reported."""
    files = {"common/a.py": "def f():\n    from models.b import g\n",
             "models/b.py": "from models.c import h\n", "models/c.py": "import models.b\n"}
    known = {}
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
        known[name.removesuffix(".py").replace("/", ".")] = tmp_path / name
    edges = {name: imports_of(path, known) for name, path in known.items()}
    assert edges == {"common.a": {"models.b"}, "models.b": {"models.c"}, "models.c": {"models.b"}}
    assert layer_violations(edges) == ["common.a imports models.b"]
    assert cycles(edges) == ["models.b -> models.c -> models.b"]
