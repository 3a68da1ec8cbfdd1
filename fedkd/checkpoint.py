"""Checkpoints: the server's state after every round, and each site's state after its rounds.

A checkpoint is one ``.npz`` file: named arrays plus a JSON document (stored as the
``__meta__`` byte array), written to a temporary name and renamed into place, so a crash
mid-write leaves the previous checkpoint intact and a reader never sees half a file.
Floats survive exactly (arrays bit for bit; JSON floats through ``repr``).

* **Server** (:func:`write_server_checkpoint` / :func:`read_server_checkpoint`): one file
  per run, ``<run_dir>/checkpoint.npz``, replaced after every round. What goes in is the
  ServerApp's business (round, fused knowledge per partition id, global student, history,
  bytes, dropouts); Flower node ids are not stable across restarts and are not kept.
* **Site** (:class:`SiteStateStore`): ``<state_dir>/<run-name>/site-<id>/round-NNNN.npz``,
  one file per trained round, the latest ``keep`` (2) kept: the server's checkpoint
  is at most one round behind a site's latest state. A site asked to train round r
  continues from its latest state before r, whether it comes from memory, from disk after
  its SuperNode restarted (rejoin), or from disk in a new Flower run that resumes a
  stopped one.

No Flower imports: the apps translate their records to arrays and JSON.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

META_KEY = "__meta__"
SERVER_CHECKPOINT = "checkpoint.npz"
CHECKPOINT_FORMAT = 1
_ROUND_FILE = re.compile(r"^round-(\d{4,})\.npz$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or belongs to a different run."""


def save_checkpoint(path: str | Path, *, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> Path:
    """Write ``arrays`` and the JSON-able ``meta`` to ``path`` atomically, readable and
    writable by its owner only (mode 0600: a site's state holds its model and ledger)."""
    path = Path(path)
    if META_KEY in arrays:
        raise ValueError(f"array name {META_KEY!r} is reserved")
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {name: np.asarray(a) for name, a in arrays.items()}
    payload[META_KEY] = np.frombuffer(json.dumps(dict(meta)).encode(), dtype=np.uint8)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # owner only: site state is private
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``(arrays, meta)`` from a file written by :func:`save_checkpoint`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
        meta = json.loads(arrays.pop(META_KEY).tobytes().decode())
    except Exception as err:  # noqa: BLE001  truncated / foreign file: one clear message
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(err).__name__}: {err})") from None
    return arrays, meta


# ---------------------------------------------------------------------------- server


def write_server_checkpoint(
    run_dir: str | Path, *, round_number: int, arrays: Mapping[str, np.ndarray], state: Mapping[str, Any]
) -> Path:
    """The server's state after ``round_number`` (replaces the previous checkpoint)."""
    meta = {"format": CHECKPOINT_FORMAT, "round": int(round_number), "state": dict(state)}
    return save_checkpoint(Path(run_dir) / SERVER_CHECKPOINT, arrays=arrays, meta=meta)


def read_server_checkpoint(run_dir: str | Path) -> tuple[int, dict[str, np.ndarray], dict[str, Any]]:
    """``(round, arrays, state)`` of the run's last checkpoint."""
    arrays, meta = load_checkpoint(Path(run_dir) / SERVER_CHECKPOINT)
    if meta.get("format") != CHECKPOINT_FORMAT or "round" not in meta:
        raise CheckpointError(
            f"{Path(run_dir) / SERVER_CHECKPOINT} has format {meta.get('format')!r}; "
            f"this fedkd reads format {CHECKPOINT_FORMAT}"
        )
    return int(meta["round"]), arrays, meta["state"]


# ---------------------------------------------------------------------------- sites


class SiteStateStore:
    """One site's per-round states for one run (see the module doc).

    >>> import tempfile
    >>> store = SiteStateStore(tempfile.mkdtemp(), run_key="demo", client=0)
    >>> _ = store.save(1, arrays={"w": np.ones(2)}, meta={"rounds-trained": 1})
    >>> _ = store.save(2, arrays={"w": np.zeros(2)}, meta={"rounds-trained": 2})
    >>> store.latest(before=2), store.latest(before=9), store.latest(before=1)
    (1, 2, None)
    """

    def __init__(self, state_dir: str | Path, *, run_key: str, client: int, keep: int = 2) -> None:
        parts = Path(run_key).parts
        if not parts or Path(run_key).is_absolute() or ".." in parts:
            raise ValueError(f"run key must be a relative name such as the run-name; got {run_key!r}")
        if keep < 1:
            raise ValueError(f"keep must be >= 1; got {keep}")
        self.directory = Path(state_dir).expanduser() / run_key / f"site-{int(client)}"
        self.keep = keep

    def path(self, round_number: int) -> Path:
        return self.directory / f"round-{int(round_number):04d}.npz"

    def rounds(self) -> list[int]:
        if not self.directory.is_dir():
            return []
        found = (_ROUND_FILE.match(p.name) for p in self.directory.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def latest(self, *, before: int) -> int | None:
        """The latest saved round strictly before ``before``, or None."""
        earlier = [r for r in self.rounds() if r < before]
        return earlier[-1] if earlier else None

    def save(self, round_number: int, *, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> Path:
        """Save the state after ``round_number``; drop states beyond the ``keep`` latest
        and any state of a later round (a retried or resumed round supersedes them)."""
        path = save_checkpoint(self.path(round_number), arrays=arrays,
                               meta={"format": CHECKPOINT_FORMAT, "round": int(round_number), **meta})
        rounds = self.rounds()
        stale = [r for r in rounds if r > round_number] + [r for r in rounds if r <= round_number][: -self.keep]
        for r in stale:
            self.path(r).unlink(missing_ok=True)
        return path

    def load(self, round_number: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        return load_checkpoint(self.path(round_number))

    def load_latest(self, *, before: int) -> tuple[int, dict[str, np.ndarray], dict[str, Any]] | None:
        """The latest readable state strictly before round ``before``: ``(round, arrays,
        meta)``, or None. A state file that cannot be read (truncated, corrupt) is skipped
        for the one kept before it, so one bad file costs a round of progress, not the site."""
        for round_number in reversed([r for r in self.rounds() if r < before]):
            try:
                arrays, meta = self.load(round_number)
            except CheckpointError:
                continue
            return round_number, arrays, meta
        return None

    def noise_secret(self) -> bytes:
        """The site's noise secret for this run (``noise-secret`` next to its states): read,
        or drawn from the operating system (:func:`fedkd.seeds.new_site_secret`) and
        written with mode 0600 the first time. Kept with the states so that a resumed or
        retried round draws the noise it drew before; never sent anywhere."""
        return read_or_create_secret(self.directory / NOISE_SECRET)


NOISE_SECRET = "noise-secret"


def read_or_create_secret(path: str | Path) -> bytes:
    """The 32-byte secret in ``path`` (hex text), created atomically with mode 0600 when
    absent (linked into place: two processes never keep two different secrets). A file
    that is not 32 bytes of hex, or that others may read, is refused with
    :class:`CheckpointError` naming it."""
    from fedkd.seeds import new_site_secret

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():  # written whole under a temporary name, then linked into place:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # a reader never sees half a secret
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(new_site_secret().hex())
                handle.flush()
                os.fsync(handle.fileno())
            os.link(tmp, path)  # fails if another process linked its secret first: keep that one
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    if path.stat().st_mode & 0o077:
        raise CheckpointError(f"site secret {path} is readable by others (mode {path.stat().st_mode & 0o777:o}); "
                              "chmod 600 it")
    try:
        key = bytes.fromhex(path.read_text().strip())
    except ValueError:
        key = b""
    if len(key) != 32:
        raise CheckpointError(f"site secret {path} is not 64 hex digits; delete it to draw a new one")
    return key


# ---------------------------------------------------------------------------- resuming

RESUME_MAY_CHANGE = ("checkpoint.resume", "round-timeout", "num-server-rounds")
"""Settings a resumed run may change; every other one must equal the stopped run's."""


def resume_problems(saved: Mapping[str, Any], new: Mapping[str, Any], *, checkpoint_round: int) -> list[str]:
    """Why the flat config ``new`` cannot continue a run configured as ``saved`` (empty: it can)."""
    problems = [
        f"{key}: the stopped run had {saved.get(key)!r}, this one has {new.get(key)!r}"
        for key in sorted(set(saved) | set(new))
        if key not in RESUME_MAY_CHANGE and saved.get(key) != new.get(key)
    ]
    if int(new.get("num-server-rounds", 0)) < checkpoint_round:
        problems.append(
            f"num-server-rounds: {new.get('num-server-rounds')} is below the {checkpoint_round} "
            "rounds already completed"
        )
    return problems


def read_resumable_checkpoint(run_dir: str | Path, *, config_flat: Mapping[str, Any]) -> tuple[int, dict[str, np.ndarray], dict[str, Any]]:
    """``(round, arrays, state)`` of the stopped run in ``run_dir``, after checking that a run
    configured as ``config_flat`` may continue it (:func:`resume_problems`); raises
    :class:`CheckpointError` listing every difference."""
    round_number, arrays, state = read_server_checkpoint(run_dir)
    problems = resume_problems(state.get("config", {}), config_flat, checkpoint_round=round_number)
    if problems:
        raise CheckpointError(f"cannot resume {Path(run_dir).name} with a different configuration: "
                              + "; ".join(problems))
    return round_number, arrays, state
