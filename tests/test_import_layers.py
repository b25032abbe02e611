"""The library's layers: `library/io` <- `library/models` <- `library/data` <- `library/training`.

Every import (module level, inside functions and under TYPE_CHECKING alike) of every module under `library/` and
`networks/` is read with `ast`; an import that runs upward, or a cycle between modules, fails naming the line.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

# Lower rank = lower layer. A module may import its own layer and any lower one.
LAYER_RANK = {"library.errors": 0, "library.io": 1, "library.models": 2, "networks": 3, "library.data": 4,
              "library.training": 5}
# networks/ (the LoRA modules and file formats) sits on io and models: the models it attaches to and the files it
# writes; nothing in library/ may import it, and it may not reach into data or training.


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _project_modules() -> dict[str, Path]:
    modules = {}
    for top in ("library", "networks"):
        for path in sorted((REPO_ROOT / top).rglob("*.py")):
            modules[_module_name(path)] = path
    return modules


def _layer(module: str) -> str | None:
    for layer in sorted(LAYER_RANK, key=len, reverse=True):
        if module == layer or module.startswith(layer + "."):
            return layer
    return None


def _imports(path: Path, modules: dict[str, Path]) -> list[tuple[int, str]]:
    """(line, imported project module) for every import statement in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.append((node.lineno, submodule if submodule in modules else node.module))
    return [(line, name) for line, name in found if name.split(".")[0] in ("library", "networks")
            or name in ("train_network", "anima_train_network")]


def _graph() -> tuple[dict[str, Path], dict[str, list[tuple[int, str]]]]:
    modules = _project_modules()
    return modules, {name: _imports(path, modules) for name, path in modules.items()}


def test_every_library_module_belongs_to_a_layer() -> None:
    modules, _ = _graph()
    loose = [name for name in modules if _layer(name) is None and name not in ("library", "networks")]
    assert not loose, f"modules outside the layers (move them into io/models/data/training): {loose}"


def test_no_import_runs_upward() -> None:
    modules, graph = _graph()
    upward = []
    for name, imports in graph.items():
        own = _layer(name)
        for line, target in imports:
            target_layer = _layer(target)
            if target_layer is None:
                upward.append(f"{modules[name]}:{line}: imports {target}, which is not part of library/ or networks/")
            elif own is not None and LAYER_RANK[target_layer] > LAYER_RANK[own]:
                upward.append(f"{modules[name]}:{line}: {own} imports {target} ({target_layer} is above it)")
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_import_cycle() -> None:
    modules, graph = _graph()
    edges = {name: [(line, target) for line, target in imports if target in modules and target != name]
             for name, imports in graph.items()}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[tuple[str, int]] = []
    cycles: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        for line, target in edges[name]:
            path.append((name, line))
            if state.get(target) == 1:
                start = next(i for i, (module, _) in enumerate(path) if module == target)
                cycles.append(" -> ".join(f"{modules[m].relative_to(REPO_ROOT)}:{ln}" for m, ln in path[start:])
                              + f" -> {target}")
            elif target not in state:
                visit(target)
            path.pop()
        state[name] = 2

    for name in sorted(edges):
        if name not in state:
            visit(name)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_layer_checker_reports_an_upward_import(tmp_path: Path) -> None:
    """The checker itself: a data module importing training is reported with its line."""
    fake = tmp_path / "library" / "data" / "bad.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("import os\n\nfrom library.training.losses import per_sample_loss\n", encoding="utf-8")
    imports = _imports(fake, {"library.training.losses": fake})
    assert imports == [(3, "library.training.losses")]
    assert LAYER_RANK[_layer(imports[0][1])] > LAYER_RANK[_layer("library.data.bad")]
