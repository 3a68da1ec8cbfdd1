"""Privacy-leakage audits: what did a federation actually leak? (DESIGN.md section 6)

Pure functions on arrays and tensors, one job per module:

* :mod:`fedkd.audit.metrics`   ROC AUC, TPR at low FPR with bootstrap CIs, advantage, the
  strongest attack per target;
* :mod:`fedkd.audit.attacks`   membership scores: LOSS threshold, LiRA and RMIA offline /
  online, trained black-box classifiers (random forest, gradient boosting);
* :mod:`fedkd.audit.exposure`  Secret Sharer canary exposure (rank and skew-normal);
* :mod:`fedkd.audit.one_run`   one-run empirical epsilon lower bound (Steinke et al. 2023);
* :mod:`fedkd.audit.canaries`  which of a site's examples are audit candidates and members,
  and the text secret inserted into its private data;
* :mod:`fedkd.audit.run`       auditing a finished run directory (threat models, surrogates,
  reference models);
* :mod:`fedkd.audit.report`    ``audit.json``, ``audit.md`` and the PNG plots.

No Flower imports: the apps only record what an audit needs (see docs/audit.md).
"""
