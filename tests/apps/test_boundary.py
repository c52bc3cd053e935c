"""The demo and the benchmarks are applications of the library: no core module imports `dtrpo.apps`, except
the CLI, which imports each application inside its command so that `import dtrpo.cli` loads none."""

import ast
from pathlib import Path

import dtrpo

PACKAGE = Path(dtrpo.__file__).parent
CORE = sorted(p for p in PACKAGE.rglob("*.py") if "apps" not in p.relative_to(PACKAGE).parts)


def imported_modules(nodes) -> list[str]:
    """Every module an `import` or `from ... import` among `nodes` names, relative ones resolved to `dtrpo.*`."""
    names = []
    for node in nodes:
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # `from . import apps` or `from .apps import demo`
                base = "dtrpo." + base if base else "dtrpo"
            names += [base] + [f"{base}.{alias.name}" for alias in node.names]
    return names


def is_apps(name: str) -> bool:
    return name == "dtrpo.apps" or name.startswith("dtrpo.apps.")


def test_the_core_is_found():
    assert {"masking.py", "trainer.py", "cli.py", "spec.py"} <= {p.name for p in CORE}


def test_no_core_module_imports_the_apps():
    for path in CORE:
        if path.name == "cli.py":
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        found = [name for name in imported_modules(ast.walk(tree)) if is_apps(name)]
        assert not found, f"{path.relative_to(PACKAGE.parent)} imports {found}"


def test_the_cli_imports_the_apps_only_inside_commands():
    tree = ast.parse((PACKAGE / "cli.py").read_text())
    top_level = [name for name in imported_modules(tree.body) if is_apps(name)]
    assert not top_level, f"dtrpo/cli.py imports {top_level} at module level"
    assert any(is_apps(name) for name in imported_modules(ast.walk(tree)))  # the demo and bench commands


def test_the_apps_import_one_another_one_way():
    """No circle among the applications (imports inside functions included): the quality study's driver imports
    its report and diagnostics, which import the study's definitions, never back."""
    apps = {p.stem: p for p in (PACKAGE / "apps").glob("*.py") if p.stem != "__init__"}
    edges = {
        name: {m.split(".")[2] for m in imported_modules(ast.walk(ast.parse(path.read_text()))) if is_apps(m)}
        & set(apps)
        for name, path in apps.items()
    }
    assert {"quality_report", "quality_diagnostics"} <= edges["quality_study"] and not edges["quality"] & {
        "quality_report",
        "quality_diagnostics",
        "quality_study",
    }

    def reaches(start: str, goal: str, seen: frozenset = frozenset()) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in edges[start])

    circles = [name for name in apps if reaches(name, name)]
    assert not circles, f"apps modules in an import circle: {circles} ({edges})"


def test_no_import_circle_anywhere_in_the_package():
    """Every module's imports (inside functions too, which still make a circle a reader must follow) form no
    circle: one direction of imports, from the command line down to the core."""
    from tests.import_graph import cycles, edges

    graph = edges()
    assert {"dtrpo.cli", "dtrpo.iterate", "dtrpo.apps.rounds", "dtrpo.families.loading"} <= set(graph)
    assert "dtrpo.trainer" in graph["dtrpo.iterate"]  # the graph reads function-level imports, resolved
    assert not cycles(graph), f"import circles in dtrpo/: {cycles(graph)}"


def test_the_core_never_imports_the_command_line_or_the_apps():
    """Library code (the core and the apps) never imports `dtrpo.cli`; the core never imports `dtrpo.apps`."""
    from tests.import_graph import edges

    graph = edges()
    up = {
        a: sorted(b for b in targets if b == "dtrpo.cli" or (is_apps(b) and not is_apps(a)))
        for a, targets in graph.items()
        if a != "dtrpo.cli"
    }
    found = {a: b for a, b in up.items() if b}
    assert not found, f"imports running up to the command line or the apps: {found}"
