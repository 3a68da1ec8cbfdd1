"""Plugins: a model, a dataset or a fusion rule named by its import path, ``"package.module:name"``.

A config names a component either by its registered name (``model.architectures =
"mlp-small"``) or by an import path (``model.architectures = "mypkg.nets:MyNet"``,
``data.dataset = "mypkg.data:load"``, ``fusion.method = "mypkg.fusion:rule"``). Every
process that needs the component imports it itself from the path in the run config: the
driver, the server, every site and every Ray worker of the simulation engine. A decorator
registration (``@MODELS.register("my-net")``) in the driver does not reach Ray workers,
which import fedkd afresh; an import path does.

Import paths resolve as ``python -m`` resolves modules: installed packages, ``PYTHONPATH``
and the current directory. :func:`plugin_search_path` gives the folders a plugin was found
in, so that the simulation engine's workers (other processes) find it too.

What each kind of plugin is:

* **model**: a callable ``factory(*, input_shape: tuple[int, ...], num_classes: int) ->
  torch.nn.Module`` (an ``nn.Module`` class taking those keywords qualifies) mapping
  ``[B, *input_shape]`` float inputs to ``[B, num_classes]`` logits. An attribute
  ``modality = "text"`` on it says it reads token ids.
* **dataset**: a callable ``load(*, path: str, seed: int)`` returning ``(x, y)`` or
  ``(x, y, num_classes)``: features ``[n, ...]`` and integer labels ``[n]``.
* **fusion rule**: a callable ``rule(knowledge, mask, **params)`` with ``knowledge``
  ``[N, P, C]`` (rows are probability vectors), ``mask`` ``[N, P]`` (rows that carry
  information) and the fusion parameters as keywords (``beta``, ``threshold``, ...; take
  ``**params``), returning a :class:`fedkd.fusion.FusionResult` or a pair ``(fused [N, P, C],
  weights [N, N])``.

>>> is_plugin_path("mypkg.nets:MyNet"), is_plugin_path("mlp-small"), is_plugin_path("hf:/models/x")
(True, False, False)
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


class PluginError(ValueError):
    """A plugin that cannot be imported or does not have the expected shape (one line)."""


def is_plugin_path(name: str) -> bool:
    """``"package.module:attribute"`` (dotted identifiers on both sides of one colon)."""
    return isinstance(name, str) and bool(_PATH.match(name.strip()))


def _import_module(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        cwd = os.getcwd()
        if err.name and module.startswith(err.name) and cwd not in sys.path and "" not in sys.path:
            sys.path.append(cwd)  # resolve as `python -m` does: the current directory too
            try:
                return importlib.import_module(module)
            except ModuleNotFoundError:
                sys.path.remove(cwd)
        raise


def load_plugin(path: str, *, kind: str) -> Callable[..., Any]:
    """The callable at import path ``path`` (``"package.module:name"``); raises
    :class:`PluginError` with one line naming ``kind``, the path and the cause."""
    path = path.strip()
    if not is_plugin_path(path):
        raise PluginError(f"{kind} plugin '{path}': expected an import path 'package.module:name'")
    module_name, _, attribute = path.partition(":")
    try:
        target: Any = _import_module(module_name)
    except Exception as err:  # noqa: BLE001  any import-time failure is the plugin's: one line
        raise PluginError(f"{kind} plugin '{path}' cannot be imported: {type(err).__name__}: {err}") from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise PluginError(f"{kind} plugin '{path}': module '{module_name}' has no attribute '{attribute}'")
        target = getattr(target, part)
    if not callable(target):
        raise PluginError(f"{kind} plugin '{path}' is a {type(target).__name__}, not a callable")
    return target


def config_plugins(config: Any) -> list[str]:
    """The import paths a :class:`fedkd.config.Config` names (models, teachers, the global
    student, the dataset, the fusion rule)."""
    names = [n.strip() for n in config.model.architectures.split(",")]
    names += [config.teacher_for(c) for c in range(config.data.num_clients)]
    names += [config.global_student.model, config.data.dataset, config.fusion.method]
    return [n for n in dict.fromkeys(names) if n and is_plugin_path(n)]


def plugin_search_path(paths: list[str]) -> list[str]:
    """The folders the plugin modules of ``paths`` were imported from (the folder above each
    top-level package or module), for ``PYTHONPATH`` of processes started later. Plugins
    that are not loaded, or installed packages in site-packages, add nothing new."""
    folders: list[str] = []
    for path in paths:
        if not is_plugin_path(path):
            continue
        top = path.partition(":")[0].split(".")[0]
        module = sys.modules.get(top)
        origin = getattr(module, "__file__", None)
        if origin is None:
            continue
        file = Path(origin).resolve()
        folder = str(file.parent.parent if file.name == "__init__.py" else file.parent)
        if folder not in folders:
            folders.append(folder)
    return folders


def export_search_path(folders: list[str]) -> None:
    """Put ``folders`` in front of ``PYTHONPATH`` in this process's environment (which the
    simulation engine's workers inherit), once each."""
    current = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    missing = [f for f in folders if f not in current]
    if missing:
        os.environ["PYTHONPATH"] = os.pathsep.join([*missing, *current])
