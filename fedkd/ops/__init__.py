"""Operating fedkd on several hosts: what an operator or a site's IT runs, apart from the
algorithm modules.

* :mod:`fedkd.ops.deploy`  TLS certificates, SuperNode keys, site data files
  (``export_partitions``), the Flower app's ``pyproject.toml`` and the exact Flower
  commands behind ``fedkd deploy ...`` (docs/deployment.md);
* :mod:`fedkd.ops.node`  a site's node config (``partition-id``, ``data-path``, ...) checked,
  and the data a deployed site loads from it.

No Flower imports: these are file and command builders, unit-testable anywhere.
"""
