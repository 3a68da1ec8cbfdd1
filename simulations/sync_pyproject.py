"""Rewrite pyproject.toml's ``[tool.flwr.app.config]`` tables from the config defaults.

``flwr run .`` reads the run config from pyproject.toml, so the table must list every
key of :class:`fedkd.config.Config` with its default (tests/test_config.py checks it).
Run this after adding or changing a config key::

    python -m simulations.sync_pyproject
"""

from __future__ import annotations

import re
from pathlib import Path

import tomli_w

from fedkd.config import Config

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
# from the first config table up to the next table that is not part of it, or to the
# first comment line after a blank line (the file's closing notes), or the end
_BLOCK = re.compile(r"^\[tool\.flwr\.app\.config\]\n.*?(?=^\[(?!tool\.flwr\.app\.config)|\n(?=#)|\Z)",
                    re.S | re.M)


def synced(text: str) -> str:
    table = tomli_w.dumps({"tool": {"flwr": {"app": {"config": Config().to_nested()}}}})
    if not _BLOCK.search(text):
        raise SystemExit("pyproject.toml has no [tool.flwr.app.config] table")
    return re.sub(r"\n{3,}", "\n\n", _BLOCK.sub(lambda _: table + "\n", text, count=1))


def main() -> None:
    text = PYPROJECT.read_text()
    new = synced(text)
    PYPROJECT.write_text(new)
    print("pyproject.toml: run config " + ("unchanged" if new == text else "updated"))


if __name__ == "__main__":
    main()
