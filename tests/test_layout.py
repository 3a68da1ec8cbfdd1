"""The project's layering: fedkd/ is pure (no Flower), the apps are thin glue."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import fedkd

ROOT = Path(__file__).resolve().parents[1]


def test_fedkd_modules_import_without_flower():
    modules = [f"fedkd.{m.name}" for m in pkgutil.iter_modules(fedkd.__path__)]
    assert "fedkd.fusion" in modules and "fedkd.cli" in modules
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "loaded = sorted(m for m in sys.modules if m == 'flwr' or m.startswith('flwr.'))\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def _imports(path: Path) -> list[tuple[str, ast.AST]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, node))
        elif isinstance(node, ast.Import):
            found.extend((alias.name, node) for alias in node.names)
    return found


def test_library_never_imports_the_apps_at_module_level():
    for path in (ROOT / "fedkd").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:  # module level only; the CLI imports the runner lazily
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                for name in names:
                    assert not str(name).split(".")[0] in {"flwr", "server", "clients", "simulations"}, (
                        f"{path.relative_to(ROOT)} imports {name}"
                    )


def test_apps_import_named_pieces_of_fedkd_only():
    for folder in ("server", "clients"):
        for path in (ROOT / folder).glob("*.py"):
            for module, node in _imports(path):
                if module.startswith("fedkd"):
                    assert isinstance(node, ast.ImportFrom), f"{path.name}: import {module}"
                    assert all(alias.name != "*" for alias in node.names), f"{path.name}: star import"
