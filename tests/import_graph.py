"""The import graph of the `dtrpo` package, read with `ast` (imports at module level and inside functions alike),
and the measures the layering test and the refactor's closing note use: files, floors, imports, imports running
back up a floor, circles, the longest functions.

    python -m tests.import_graph        # prints the numbers
"""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dtrpo"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (`dtrpo.apps.demo`; a package by its own name)."""
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_names(path: Path, package: str, known: set[str]) -> list[str]:
    """The package modules an `import` or `from ... import` anywhere in the file names (relative ones resolved
    against `package`, the package the file belongs to): `from a import b` is an import of `a.b` when that is a
    module, of `a` when `b` is a name defined there."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = parts[: len(parts) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                names.append(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return [n for n in names if n in known]


def edges() -> dict[str, set[str]]:
    """module -> the package modules it imports (itself and the root `dtrpo`, a lazy index of names, left out)."""
    mods = modules()
    graph = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        graph[name] = set(imported_names(path, package, set(mods))) - {name, "dtrpo"}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def back_up(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """The imports running back up: the fewest imports whose removal leaves no circle (brute force within each
    circle, which is small); every other import runs down, from a higher floor to a lower one."""
    found = []
    for component in cycles(graph):
        inner = sorted((a, b) for a in component for b in graph[a] if b in component)
        for size in range(1, len(inner) + 1):
            cut = next(
                (c for c in itertools.combinations(inner, size) if not cycles(_without(graph, set(c), component))),
                None,
            )
            if cut:
                found += cut
                break
    return sorted(found)


def _without(graph: dict[str, set[str]], cut: set, component: list[str]) -> dict[str, set[str]]:
    return {a: {b for b in graph[a] if b in component and (a, b) not in cut} for a in component}


def floors(graph: dict[str, set[str]]) -> dict[str, int]:
    """Each module's floor: 0 for one importing no package module, else one above the highest it imports (the
    imports running back up left out)."""
    cut = set(back_up(graph))
    down = {a: {b for b in targets if (a, b) not in cut} for a, targets in graph.items()}
    floor: dict[str, int] = {}

    def level(v: str) -> int:
        if v not in floor:
            floor[v] = 1 + max((level(w) for w in down[v]), default=-1)
        return floor[v]

    for v in graph:
        level(v)
    return floor


def long_functions(limit: int = 60) -> list[tuple[int, str]]:
    """(lines, module.function) of every function longer than `limit` lines, longest first."""
    found = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    found.append((lines, f"{name.removeprefix('dtrpo.')}.{node.name}"))
    return sorted(found, reverse=True)


def report() -> dict:
    graph = edges()
    f = floors(graph)
    return {
        "files": len(graph),
        "floors": 1 + max(f.values()),
        "imports": sum(len(t) for t in graph.values()),
        "back_up": back_up(graph),
        "circles": cycles(graph),
        "long_functions": long_functions(),
        "cli_lines": len((PACKAGE / "cli.py").read_text(encoding="utf-8").splitlines()),
    }


if __name__ == "__main__":
    r = report()
    for key, value in r.items():
        print(f"{key}: {value}")
