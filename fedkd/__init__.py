"""fedkd: federated, privacy-preserving knowledge distillation on Flower.

    import fedkd

    cfg = fedkd.load_config("simulations/digits.toml", overrides={"num-server-rounds": 5})
    result = fedkd.simulate(cfg, runner="inprocess")   # or runner="flower"
    print(result.status, result.metrics["alma"], result.run_dir)
    print(fedkd.compare([result.run_dir], format="md"))

Importing fedkd imports neither Flower nor torch; a ``runner="flower"`` run starts Flower
through :mod:`fedkd.engine`. See :mod:`fedkd.api`.
"""

from __future__ import annotations

from fedkd.api import RunResult, audit, compare, simulate
from fedkd.config import Config, ConfigError, load_config


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fedkd")
    except PackageNotFoundError:
        return "0.1.0"


__version__ = _version()

__all__ = ["Config", "ConfigError", "RunResult", "__version__", "audit", "compare", "load_config", "simulate"]
