"""Temporary folders that a killed process does not leave behind for good.

``fedkd simulate`` writes its Flower app folder (``fedkd-app-*``) and ``fedkd deploy run``
the app it submits (``fedkd-deploy-app-*``) to the system's temporary folder. A process
killed with SIGKILL (or a machine losing power) cannot remove its folder, so each folder's
name carries its owner's process id (``<prefix><pid>-<random>``) and every new one first
removes the folders of that prefix whose process is gone (:func:`remove_stale`): a killed
run's folder goes at the next start.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale(prefix: str, *, root: str | Path | None = None) -> list[Path]:
    """Remove this user's ``<root>/<prefix><pid>-*`` folders whose process ``pid`` no longer
    runs (``root``: the system's temporary folder); returns those removed."""
    root = Path(root or tempfile.gettempdir())
    pattern = re.compile(rf"{re.escape(prefix)}(\d+)-[^/]+")
    removed = []
    for path in root.glob(f"{prefix}*"):
        match = pattern.fullmatch(path.name)
        try:
            ours = path.is_dir() and not path.is_symlink() and path.stat().st_uid == os.getuid()
        except OSError:
            continue
        if match and ours and int(match.group(1)) != os.getpid() and not _alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


@contextlib.contextmanager
def owned_temp_dir(prefix: str, *, root: str | Path | None = None) -> Iterator[Path]:
    """A new ``<root>/<prefix><pid>-<random>`` folder, removed on exit; stale folders of the
    same prefix (their process gone) are removed first."""
    remove_stale(prefix, root=root)
    path = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=root))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
