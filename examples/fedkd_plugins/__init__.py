"""An example fedkd plugin package: a model, a dataset and a fusion rule named by import path.

Use it from the repository root (or put ``examples/`` on ``PYTHONPATH``)::

    PYTHONPATH=examples fedkd simulate \
        --set 'model.architectures="fedkd_plugins.nets:TinyNet"' \
        --set 'fusion.method="fedkd_plugins.fusion:median_rule"' \
        --set 'data.dataset="fedkd_plugins.data:load_breast_cancer"'

Every process of the run (the driver, the server, each site, each Ray worker) imports these
modules itself from the import paths in the run config (:mod:`fedkd.plugins`).
"""
