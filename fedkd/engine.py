"""The only entry from fedkd/ into simulations/ and Flower.

fedkd/ is the library and imports no Flower (tests/test_layout.py); federations run in
the apps (server/, clients/) on Flower's simulation engine, which simulations/runner.py
starts. Everything in fedkd/ that runs federations (the CLI's ``simulate``, ``study`` and
``audit --sweep``) comes through this module, which imports simulations/ lazily, inside
its functions, so that importing fedkd never loads Flower:

* :func:`launch_simulation`  the one function that starts the simulation engine;
* :func:`launch_inprocess`   the in-process runner (``simulations/floor.py``), no Flower;
* :func:`launch_fedavg`      the FedAvg baseline (``simulations/floor.py``), in process;
* :func:`launch_audit_sweep` the audit trade-off study's driver
  (simulations/studies/audit_sweep.py), every federation of which it runs through
  :func:`launch_simulation`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedkd.config import Config

if TYPE_CHECKING:
    from fedkd.audit.sweep import Setting


def launch_simulation(config: Config, *, verbose: bool = False, num_supernodes: int | None = None,
                      ray_address: str | None = None) -> Path:
    """Run one federation of ``config`` on Flower's simulation engine
    (``simulations.runner.simulate``; ``num_supernodes`` defaults to ``data.num-clients``;
    ``ray_address``: a running Ray cluster's ``HOST:PORT`` to run the sites on, default the
    ``RAY_ADDRESS`` environment variable, else a Ray instance of this process) and return
    its run directory.

    The only function in fedkd/ that starts Flower: Flower is imported here, when called.
    """
    from simulations.runner import simulate

    options: dict[str, Any] = {}
    if num_supernodes is not None:
        options["num_supernodes"] = num_supernodes
    if ray_address is not None:
        options["ray_address"] = ray_address
    return simulate(config, verbose=verbose, **options)


def launch_inprocess(config: Config) -> Path:
    """Run one federation of ``config`` in this process (``simulations.floor.run_floor``:
    the same round loop, no Flower) and return its run directory."""
    from simulations.floor import run_floor

    return run_floor(config)


def fedavg_architecture(config: Config) -> str:
    """FedAvg's one architecture for ``config``: ``model.architectures`` when it names one,
    else the one with the most parameters (FedAvg averages one model, so a mixed federation
    is given its largest: on digits ``mlp-large``, as in docs/benchmarks.md)."""
    names = [name.strip() for name in config.model.architectures.split(",") if name.strip()]
    if len(set(names)) == 1:
        return names[0]
    from fedkd.data import load_federation
    from fedkd.fedavg import parameter_count
    from fedkd.models import build_model

    split = load_federation(config.data, config.seed)
    sizes = {name: parameter_count(build_model(name, input_shape=split.input_shape, num_classes=split.num_classes,
                                               seed=0, **split.model_options)) for name in dict.fromkeys(names)}
    return max(sizes, key=sizes.get)


def launch_fedavg(config: Config) -> Path:
    """Run FedAvg (``simulations.floor.run_fedavg``: every site trains one architecture,
    :func:`fedavg_architecture`, from the global weights; the server averages them) on
    ``config``'s split, in this process; return its run directory."""
    import dataclasses

    from simulations.floor import run_fedavg

    model = dataclasses.replace(config.model, architectures=fedavg_architecture(config))
    return run_fedavg(dataclasses.replace(config, model=model))


def launch_audit_sweep(
    base: Config,
    settings: Sequence[Setting],
    *,
    verbose: bool = False,
    prepare: Callable[[Config], Config] = lambda config: config,
    **options: Any,
) -> tuple[Path, list[dict[str, Any]]]:
    """Run and audit every setting of a ``fedkd audit --sweep``
    (``simulations.studies.audit_sweep.run_sweep``, which takes ``options``), each
    federation of ``prepare(config)`` through :func:`launch_simulation`. Returns the sweep
    folder and its rows."""
    from simulations.studies.audit_sweep import run_sweep

    return run_sweep(base, settings, simulate=lambda config: launch_simulation(prepare(config), verbose=verbose),
                     **options)
