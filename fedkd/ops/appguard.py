"""What a site's app guard accepts: fedkd's app and nothing else (pure checks, no Flower).

A SuperNode in Flower's ``process`` isolation runs no app itself; it waits for an outside
process to take each task from its local Runtime API. fedkd's guard
(``clients/app_guard.py``, started by ``fedkd deploy supernode``) is that process: for
every task it reads the app (the FAB, a zip) and the run config the SuperLink sent, and
runs Flower's ClientApp runtime only when :func:`task_problems` finds nothing. Otherwise
the task fails with the reason, before the FAB is installed or any of its modules
imported: a foreign app never executes on the site.

Why a content rule and not one pinned FAB hash: fedkd's app (:func:`fedkd.ops.deploy.app_pyproject`)
is a ``pyproject.toml`` only, carrying the run's configuration, so its hash changes with
every run name or setting, while the code that runs is the fedkd installed on the site
(the package the site approved by installing it). The guard therefore requires that the
FAB holds no file but ``pyproject.toml`` (and Flower's ``.info/CONTENT`` manifest), that
its ClientApp is fedkd's (:data:`CLIENTAPP`), and that the run config names no import
path (``package.module:name``: a model, dataset or fusion plugin, imported and called on
the site) except those the site allows. ``--fab-hash`` pins exact FABs on top, for a
site that approves each run.
"""

from __future__ import annotations

import io
import tomllib
import zipfile
from collections.abc import Collection, Mapping
from typing import Any

from fedkd.plugins import is_plugin_path

CLIENTAPP = "clients.client_app:app"
FAB_FILES = frozenset({"pyproject.toml", ".info/CONTENT"})
MAX_FAB_BYTES = 1 << 20


def fab_problems(content: bytes, *, clientapp: str = CLIENTAPP) -> list[str]:
    """Why the FAB ``content`` is not fedkd's app (empty: it is): a zip of ``pyproject.toml``
    (and ``.info/CONTENT``) only, whose ``[tool.flwr.app.components] clientapp`` is
    ``clientapp``."""
    if len(content) > MAX_FAB_BYTES:
        return [f"app: {len(content)} bytes, more than fedkd's app ever is ({MAX_FAB_BYTES})"]
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as fab:
            names = fab.namelist()
            extra = sorted(set(names) - FAB_FILES)
            if extra:
                return [f"app: carries files other than pyproject.toml ({', '.join(extra[:5])}"
                        f"{', ...' if len(extra) > 5 else ''}); fedkd's app has no code of its own"]
            pyproject = tomllib.loads(fab.read("pyproject.toml").decode())
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        return [f"app: not a readable FAB with a pyproject.toml ({type(err).__name__})"]
    components = pyproject.get("tool", {}).get("flwr", {}).get("app", {}).get("components", {})
    found = components.get("clientapp") if isinstance(components, dict) else None
    if found != clientapp:
        return [f"app: clientapp must be {clientapp!r}; got {found!r}"]
    return []


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for item in value for v in _strings(item)]
    return []


def plugin_problems(run_config: Mapping[str, Any], *, allowed: Collection[str] = ()) -> list[str]:
    """The run config's import paths (``package.module:name`` values, imported and called
    on the site) that are not in ``allowed``, one problem each."""
    return [f"run config {key}: import path {text!r} not allowed on this site (allowed: "
            f"{', '.join(sorted(allowed)) or 'none'}; fedkd deploy supernode --allow-plugin)"
            for key, value in sorted(run_config.items()) for text in _strings(value)
            if is_plugin_path(text) and text.strip() not in allowed]


def task_problems(*, fab: bytes, fab_hash: str, run_config: Mapping[str, Any],
                  allowed_plugins: Collection[str] = (), pinned_hashes: Collection[str] = ()) -> list[str]:
    """Every reason to refuse a task: :func:`fab_problems`, :func:`plugin_problems`, a
    ``fab_hash`` that is not the sha256 of ``fab``, or one not in ``pinned_hashes`` (when any)."""
    import hashlib

    problems = fab_problems(fab)
    actual = hashlib.sha256(fab).hexdigest()
    if fab_hash and fab_hash != actual:
        problems.append(f"app: announced hash {fab_hash[:12]}... is not its content's {actual[:12]}...")
    if pinned_hashes and actual not in pinned_hashes:
        problems.append(f"app: hash {actual} is not one this site pinned (--fab-hash)")
    return problems + plugin_problems(run_config, allowed=allowed_plugins)
