"""Studies: many federations each, one table (and plots) per study, resumable.

* :mod:`simulations.studies.benchmark`      ``python -m simulations.studies.benchmark
  accuracy|robustness|communication|speed|scale`` (docs/benchmarks.md): the harness and
  its accuracy and robustness grids;
* :mod:`simulations.studies.communication`  bytes on the wire, knowledge against FedAvg;
* :mod:`simulations.studies.speed`          framework overhead against the floor, and scale;
* :mod:`simulations.studies.privacy`        ``python -m simulations.studies.privacy``:
  accuracy against whole-run epsilon (docs/privacy.md);
* :mod:`simulations.studies.audit_sweep`    the driver of ``fedkd audit --sweep``
  (docs/audit.md).
"""
