"""The house rules of docs/architecture.md that code can check: no import cycle in carsml (function-level imports
count too), MLflow only inside tracking/ (elsewhere only on a line whose comment says why), files a newcomer can read
(<= 450 lines unless the module docstring says why it is larger)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "carsml"
MAX_LINES = 450
LARGER_BECAUSE = "Larger than the house's 450 lines because"  # what a module docstring says to be allowed more


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _target(name: str, modules: dict[str, Path]) -> str | None:
    """The carsml module an import of `name` loads last (`carsml.a.b.func` -> `carsml.a.b`)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the carsml modules it imports anywhere in its body (module level or inside functions)."""
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("carsml"):
                targets = [_target(f"{node.module}.{alias.name}", modules) for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [_target(alias.name, modules) for alias in node.names if alias.name.startswith("carsml")]
            else:
                continue
            graph[name] |= {t for t in targets if t and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as [a, b, ..., a], or [] when the graph has none."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return []

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return []


def test_the_cycle_finder_finds_a_cycle_and_accepts_a_tree() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_no_import_cycle_in_carsml() -> None:
    cycle = find_cycle(import_graph(_modules()))
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_mlflow_is_imported_only_by_tracking() -> None:
    offenders = []
    for name, path in _modules().items():
        if name.startswith("carsml.tracking"):
            continue
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            code, _, comment = line.partition("#")
            words = code.split()
            imports_mlflow = len(words) > 1 and words[0] in ("import", "from") and (
                words[1] == "mlflow" or words[1].startswith("mlflow."))
            if imports_mlflow and "mlflow:" not in comment:  # `import mlflow  # mlflow: why this module needs it`
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{lineno}: {line.strip()}")
    assert not offenders, "MLflow outside carsml/tracking/ without a `# mlflow: <why>` comment:\n" + "\n".join(
        offenders)


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_files_stay_readable(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    if lines > MAX_LINES:
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        assert LARGER_BECAUSE in doc, (f"{path.relative_to(PACKAGE.parent)} has {lines} lines (> {MAX_LINES}); "
                                       f"split it by concern, or say in its docstring '{LARGER_BECAUSE} ...'")
