"""The trade-off study behind ``fedkd audit --sweep``: one audited run per protection
setting, then one report.

Settings (kinds): ``none`` (no protection); ``temperature`` (shielding temperature T0 only,
one run per level); ``noise`` (logit noise only, one run per level); ``shield``
(shielding only: the first temperature and the first noise level together); ``dp``
(DP-SGD only, one run per epsilon); ``both`` (the ``shield`` setting plus DP at the
middle epsilon); ``release`` (the guaranteed release mechanism, ``shield.release =
"label-rr"``, one run per release epsilon: :mod:`fedkd.privacy.release`; on the rows the
base's ``shield.release-rows`` chooses); ``dp-release`` (DP-SGD at the middle epsilon plus
label-rr at the first release epsilon); ``withhold`` (text data: nothing released on the
rows whose public text looks like personal data, ``shield.release = "withhold"`` with
``shield.release-rows = "pii"``); ``redact`` (text data: the public texts' PII-like spans
replaced before anyone predicts on them, ``data.public-redact = "pii"``). Every run has
``audit.enabled``; everything else comes from the base config, so the runs differ only in
``shield.*``, ``privacy.*`` and ``data.public-redact``.

This module holds the pure parts: the settings and each setting's configuration. The
driver that runs and audits them (``run_sweep``) is simulations/studies/audit_sweep.py,
which ``fedkd audit --sweep`` reaches through :mod:`fedkd.engine`; this module stays free
of Flower.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from fedkd.config import Config

SWEEP_KINDS = ("none", "temperature", "noise", "shield", "dp", "both", "release", "dp-release", "withhold",
               "redact")

DIGITS_SWEEP = {
    "num-server-rounds": 10,
    "data.num-clients": 4,
    "data.alpha": 1.0,
    "data.public-fraction": 0.2,
    "model.architectures": "mlp-large",
    "train.local-epochs": 5,
    "train.distill-epochs": 3,
    "global-student.epochs": 5,
    "audit.enabled": True,
    "audit.reference-models": 4,
}
"""The sweep's base settings without ``--config``: 4 digits sites (~200 private training
examples each; site 0's are the candidates), 10 rounds, an MLP that can overfit."""


@dataclass(frozen=True)
class Setting:
    name: str
    kind: str
    temperature: float = 1.0
    noise_std: float = 0.0
    epsilon: float | None = None
    release_epsilon: float | None = None
    """label-rr's epsilon per released label and round; None = no label-rr."""
    withhold: bool = False
    """``shield.release = "withhold"`` on the pii rows (the ``withhold`` kind)."""
    redact: bool = False
    """``data.public-redact = "pii"`` (the ``redact`` kind)."""


def sweep_settings(*, temperatures: Sequence[float], noises: Sequence[float], epsilons: Sequence[float],
                   release_epsilons: Sequence[float] = (), kinds: Sequence[str] = SWEEP_KINDS) -> list[Setting]:
    """The settings of one sweep (module doc), in a fixed order."""
    unknown = [k for k in kinds if k not in SWEEP_KINDS]
    if unknown:
        raise ValueError(f"unknown sweep setting(s) {', '.join(unknown)}; choose from {', '.join(SWEEP_KINDS)}")
    t0 = temperatures[0] if temperatures else 1.0
    n0 = noises[0] if noises else 0.0
    middle = sorted(epsilons)[len(epsilons) // 2] if epsilons else None  # DP of the combined settings
    out = []
    if "none" in kinds:
        out.append(Setting("none", "none"))
    if "temperature" in kinds:
        out += [Setting(f"shield-T{t:g}", "temperature", temperature=t) for t in temperatures]
    if "noise" in kinds:
        out += [Setting(f"shield-noise{n:g}", "noise", noise_std=n) for n in noises]
    if "shield" in kinds:
        out.append(Setting(f"shield-T{t0:g}-noise{n0:g}", "shield", temperature=t0, noise_std=n0))
    if "dp" in kinds:
        out += [Setting(f"dp-eps{e:g}", "dp", epsilon=e) for e in epsilons]
    if "both" in kinds and epsilons:
        out.append(Setting(f"both-T{t0:g}-noise{n0:g}-eps{middle:g}", "both", temperature=t0,
                           noise_std=n0, epsilon=middle))
    if "release" in kinds:
        out += [Setting(f"release-rr{r:g}", "release", release_epsilon=r) for r in release_epsilons]
    if "dp-release" in kinds and epsilons and release_epsilons:
        r0 = release_epsilons[0]
        out.append(Setting(f"dp-eps{middle:g}-rr{r0:g}", "dp-release", epsilon=middle, release_epsilon=r0))
    if "withhold" in kinds:
        out.append(Setting("withhold-pii", "withhold", withhold=True))
    if "redact" in kinds:
        out.append(Setting("redact-pii", "redact", redact=True))
    return out


def setting_config(base: Config, setting: Setting, *, sweep_name: str) -> Config:
    """``base`` with the setting's shielding and DP, auditing on, named ``sweep/setting``."""
    if setting.withhold:
        release = {"release": "withhold", "release_rows": "pii"}
    elif setting.release_epsilon is not None:
        release = {"release": "label-rr", "release_epsilon": setting.release_epsilon}
    else:
        release = {"release": "none", "release_rows": "all"}
    shield = dataclasses.replace(base.shield, temperature=setting.temperature, noise_std=setting.noise_std,
                                 **release)
    privacy = dataclasses.replace(base.privacy, enabled=setting.epsilon is not None,
                                  target_epsilon=setting.epsilon or base.privacy.target_epsilon)
    train = base.train
    if setting.epsilon is not None and train.mode == "joint":
        train = dataclasses.replace(train, mode="sequential")
    audit = dataclasses.replace(base.audit, enabled=True)
    fusion = base.fusion if setting.release_epsilon is not None and not setting.withhold else dataclasses.replace(
        base.fusion, release_debias="off")  # fusion.release-debias acts on label-rr settings only
    data = dataclasses.replace(base.data, public_redact="pii" if setting.redact else "none")
    return dataclasses.replace(base, data=data, shield=shield, privacy=privacy, train=train, audit=audit,
                               fusion=fusion, run_name=f"{sweep_name}/{setting.name}")
