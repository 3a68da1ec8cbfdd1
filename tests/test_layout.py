"""The project's layering, read from the source with ``ast`` (every import, function-level too):

* nothing under fedkd/ imports Flower, the apps (server/, clients/) or simulations/, except
  the one documented entry that launches the simulation engine, ``fedkd/engine.py``;
* there is no import cycle among the project's modules;
* the apps import named pieces of fedkd only, and the federation's round loop lives in
  fedkd/federation/, not in the glue.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fedkd", "server", "clients", "simulations")
OUTSIDE_THE_LIBRARY = {"flwr", "server", "clients", "simulations", "ray"}
ENTRY = "fedkd.engine"  # the only module of fedkd/ allowed to reach the apps and Flower


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[_module_name(path)] = path
    return found


def _imports(path: Path, module: str) -> list[tuple[str, int]]:
    """Every module ``path`` imports (absolute names; relative imports resolved), with lines."""
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.append((base, node.lineno))
            found.extend((f"{base}.{alias.name}", node.lineno) for alias in node.names)  # submodules
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for imported, _ in _imports(path, name):
            if imported in modules and imported != name:
                edges.add(imported)
        graph[name] = edges
    return graph


def test_the_import_reader_sees_function_level_imports(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import a\n\ndef f():\n    from b.c import d\n    import e.f\n")
    names = [n for n, _ in _imports(sample, "pkg.sample")]
    assert {"a", "b.c", "b.c.d", "e.f"} <= set(names)


def test_library_reaches_flower_and_the_apps_only_through_the_entry():
    offenders = []
    for name, path in _modules().items():
        if not name.startswith("fedkd") or name == ENTRY:
            continue
        for imported, line in _imports(path, name):
            if imported.split(".")[0] in OUTSIDE_THE_LIBRARY:
                offenders.append(f"{path.relative_to(ROOT)}:{line} imports {imported}")
    assert not offenders, "\n".join(offenders)


def test_the_entry_imports_the_engine_lazily():
    tree = ast.parse((ROOT / "fedkd" / "engine.py").read_text())
    for node in tree.body:  # module level: nothing outside the library
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            assert all(n.split(".")[0] not in OUTSIDE_THE_LIBRARY for n in names), names


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle a depth-first search meets (each as the path that closes it)."""
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return cycles


def test_no_import_cycles():
    cycles = _cycles(_graph())
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_cycle_finder_finds_a_cycle(tmp_path, monkeypatch):
    for name, body in {"a": "def f():\n    import pkg.b\n", "b": "from pkg.a import f\n"}.items():
        (tmp_path / f"{name}.py").write_text(body)
    graph = {f"pkg.{n}": {m for m, _ in _imports(tmp_path / f"{n}.py", f"pkg.{n}")} & {"pkg.a", "pkg.b"}
             for n in ("a", "b")}
    assert graph == {"pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}}  # a's import is inside a function
    assert _cycles(graph) == [["pkg.a", "pkg.b", "pkg.a"]]
    assert _cycles({"x": {"y"}, "y": {"z"}, "z": set()}) == []


def test_fedkd_modules_import_without_flower():
    names = sorted(n for n in _modules() if n.startswith("fedkd") and not n.endswith("__main__"))
    assert "fedkd.federation.loop" in names and "fedkd.cli.main" in names
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}: importlib.import_module(name)\n"
        "loaded = sorted(m for m in sys.modules if m == 'flwr' or m.startswith('flwr.'))\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_apps_import_named_pieces_of_fedkd_only():
    for folder in ("server", "clients"):
        for path in (ROOT / folder).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    assert not any(a.name.startswith("fedkd") for a in node.names), f"{path.name}: import fedkd"
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fedkd"):
                    assert all(alias.name != "*" for alias in node.names), f"{path.name}: star import"


def test_the_round_loop_lives_in_the_library_not_the_glue():
    """The apps and the in-process runner call the one loop; none of them fuses or runs rounds."""
    for path in (ROOT / "server" / "server_app.py", ROOT / "clients" / "client_app.py", ROOT / "simulations" / "floor.py"):
        names = {n for n, _ in _imports(path, _module_name(path))}
        assert "fedkd.fusion" not in names and "fedkd.fusion.fuse" not in names, path.name
        assert "fedkd.wire.validate_knowledge" not in names, path.name
    for path in (ROOT / "server" / "server_app.py", ROOT / "simulations" / "floor.py"):
        assert "fedkd.federation.loop.run_federation" in {n for n, _ in _imports(path, _module_name(path))}
