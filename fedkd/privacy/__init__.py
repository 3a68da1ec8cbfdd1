"""Record-level differential privacy for a site's private data: one budget for the whole run.

* :mod:`fedkd.privacy.accounting` -- the maths and the bookkeeping: delta, sample rate, steps,
  epsilon and the calibration of sigma (Opacus accountants), :class:`PrivacyPlan` (a site's
  whole-run plan), :class:`PrivacyLedger` (the run's one accountant history) and the one row
  format of the run's privacy ledger (:func:`ledger_metrics`, :func:`ledger_row`);
* :mod:`fedkd.privacy.dpsgd` -- DP-SGD through Opacus charged to the ledger
  (:func:`train_private`, :func:`train_private_site`) and the average of its iterates
  (:func:`iterate_average`).

No Flower imports.
"""

from fedkd.privacy.accounting import (
    ACCOUNTANTS,
    DEFAULT_ACCOUNTANT,
    EPSILON_TOLERANCE,
    LEDGER_METRICS,
    MAX_NOISE_MULTIPLIER,
    RDP_ALPHAS,
    PrivacyConfigError,
    PrivacyLedger,
    PrivacyPlan,
    PrivacyStateError,
    calibrate_noise_multiplier,
    compose,
    compose_epsilon,
    check_privacy_plans,
    create_accountant,
    default_delta,
    epsilon_for,
    get_noise_multiplier,
    ledger_metrics,
    ledger_row,
    parse_history,
    previous_history,
    plan_privacy,
    sample_rate_for,
    site_privacy_plan,
    steps_for,
)
from fedkd.privacy.dpsgd import (
    AUTO_MODES,
    GRAD_SAMPLE_MODES,
    PrivacyEngine,
    PrivateTraining,
    PrivateTrainResult,
    iterate_average,
    private_training,
    resolve_grad_sample_mode,
    train_private,
    train_private_site,
)

__all__ = [
    "ACCOUNTANTS", "AUTO_MODES", "DEFAULT_ACCOUNTANT", "EPSILON_TOLERANCE", "RDP_ALPHAS", "GRAD_SAMPLE_MODES", "LEDGER_METRICS", "MAX_NOISE_MULTIPLIER",
    "PrivacyConfigError", "PrivacyEngine", "PrivacyLedger", "PrivacyPlan", "PrivacyStateError",
    "PrivateTrainResult", "PrivateTraining", "calibrate_noise_multiplier", "check_privacy_plans", "compose", "compose_epsilon",
    "create_accountant", "default_delta", "epsilon_for", "get_noise_multiplier", "iterate_average", "ledger_metrics",
    "ledger_row", "parse_history", "plan_privacy", "previous_history", "private_training", "resolve_grad_sample_mode", "sample_rate_for", "site_privacy_plan",
    "steps_for", "train_private", "train_private_site",
]
