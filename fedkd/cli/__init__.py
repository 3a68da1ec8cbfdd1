"""The ``fedkd`` command line (console script ``fedkd = "fedkd.cli:main"``), one module
per command group:

* :mod:`fedkd.cli.main`    the parser, :func:`main`, and ``fedkd simulate``, ``study``,
  ``compare``, ``options``, ``audit``;
* :mod:`fedkd.cli.deploy`  ``fedkd deploy ...`` (multi-host deployment) and its parsers;
* :mod:`fedkd.cli.args`    what they share: ``--config`` / ``--set`` / ``--verbose``,
  loading the configuration, ``fedkd: error: ...`` lines and exit statuses.

``fedkd.cli.main`` here is the function (the package re-exports it); import the module's
other names with ``from fedkd.cli.main import ...``.
"""

from fedkd.cli.main import main

__all__ = ["main"]
