"""What one site does in a round, as plain PyTorch/NumPy task code (no Flower).

A round at site i (DESIGN section 1, step 2):

a. *distil*: fit the model to the fused knowledge F_i on the public positions it covers;
b. *local train*: cross-entropy on the private train split, with DP-SGD through the
   site's :class:`~fedkd.privacy.PrivacyLedger` when ``privacy.enabled``
   (``train.mode = "joint"`` merges a and b into CE + kd_weight * KD per step; not under
   DP, where the public KD step stays outside the DP optimizer);
c. *extract*: logits on this round's public positions;
d. *shield*: per-example temperature and logit noise -> released knowledge K_i.

The Flower ClientApp in ``clients/`` only unpacks messages, calls these functions and
packs the replies.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from torch import nn

from fedkd.config import Config, ConfigError, PrivacyConfig
from fedkd.data import ArrayDataset, ClientData, FederatedSplit
from fedkd.distillation import accuracy, distil, predict_logits, train_joint, train_supervised
from fedkd.models import build_model
from fedkd.privacy import PrivacyConfigError, PrivacyLedger, PrivacyPlan, plan_privacy, train_private
from fedkd.shielding import shield


def site_seed(config: Config, client: int, round_number: int = 0) -> int:
    """Seed of client ``client`` in round ``round_number``: reproducible, distinct per site and round."""
    return (config.seed * 1_000_003 + client * 10_007 + round_number) % 2**31


def build_site_model(config: Config, split: FederatedSplit, client: int) -> nn.Module:
    return build_model(
        config.architecture_for(client),
        input_shape=split.input_shape,
        num_classes=split.num_classes,
        seed=site_seed(config, client),
    )


def site_privacy_plan(config: Config, train: ArrayDataset) -> PrivacyPlan:
    """The site's whole-run DP plan: (epsilon, delta) over ``num-server-rounds`` rounds of
    ``train.local-epochs`` epochs, noise multiplier calibrated once (fedkd.privacy)."""
    return _cached_plan(config.privacy, len(train), config.train.batch_size,
                        config.train.local_epochs, config.num_server_rounds)


@functools.lru_cache(maxsize=256)
def _cached_plan(privacy: PrivacyConfig, n: int, batch_size: int, epochs: int, rounds: int) -> PrivacyPlan:
    # calibration is a binary search over the accountant (~1-2 s); do it once per process
    return plan_privacy(
        target_epsilon=privacy.target_epsilon,
        delta=privacy.delta or None,
        num_examples=n,
        batch_size=batch_size,
        epochs_per_round=epochs,
        rounds=rounds,
        accountant=privacy.accountant,
        max_grad_norm=privacy.max_grad_norm,
    )


def check_privacy_plans(config: Config, split: FederatedSplit) -> list[PrivacyPlan]:
    """Plan every site's budget before the run starts; refuse the config (one
    :class:`ConfigError` naming each site) when a target cannot be met."""
    if not config.privacy.enabled:
        return []
    plans, problems = [], []
    for client, data in enumerate(split.clients):
        try:
            plans.append(site_privacy_plan(config, data.train))
        except PrivacyConfigError as err:
            problems.append(f"privacy (site {client}, {len(data.train)} private examples): {err}")
    if problems:
        raise ConfigError(problems)
    return plans


@dataclass(frozen=True)
class SiteRound:
    """Released knowledge ``[len(release_positions), C]`` and the round's metrics."""

    knowledge: np.ndarray
    metrics: dict[str, float]


def run_site_round(
    *,
    model: nn.Module,
    config: Config,
    client: int,
    round_number: int,
    data: ClientData,
    public_x: np.ndarray,
    release_positions: np.ndarray,
    fused: np.ndarray | None = None,
    fused_positions: np.ndarray | None = None,
    ledger: PrivacyLedger | None = None,
) -> SiteRound:
    """Steps a-d above; ``fused`` [len(fused_positions), C] is F_i (None in round 1 or
    under fusion method ``none``). ``model`` (and ``ledger``) are updated in place.

    With a ``ledger`` (privacy on) local training is DP-SGD and the metrics carry the
    run's epsilon so far; once the next round would exceed the target, the site stops
    private training (``dp-stopped`` = 1) and keeps releasing knowledge from its model."""
    t = config.train
    seed = site_seed(config, client, round_number)
    metrics: dict[str, float] = {}
    has_fused = fused is not None and fused_positions is not None and len(fused_positions) > 0
    if ledger is not None and t.mode == "joint":
        raise ValueError("train.mode 'joint' mixes public KD into the DP step; use 'sequential'")
    if has_fused and t.mode == "joint":
        metrics["train-loss"] = train_joint(
            model, data.train, public_x[fused_positions], fused,
            epochs=t.local_epochs, batch_size=t.batch_size, lr=t.lr,
            temperature=t.kd_temperature, kd_weight=t.kd_weight, seed=seed,
        )
    else:
        if has_fused:
            metrics["distil-loss"] = distil(
                model, public_x[fused_positions], fused,
                epochs=t.distill_epochs, batch_size=t.batch_size, lr=t.lr,
                temperature=t.kd_temperature, seed=seed,
            )
        if ledger is None:
            metrics["train-loss"] = train_supervised(
                model, data.train, epochs=t.local_epochs, batch_size=t.batch_size, lr=t.lr, seed=seed
            )
        else:
            private = train_private(model, data.train, plan=ledger.plan, ledger=ledger, lr=t.lr, seed=seed)
            metrics.update(privacy_metrics(ledger))
            metrics["train-loss"] = private.loss
            metrics["dp-stopped"] = float(private.stopped)
            metrics["dp-round-steps"] = float(private.steps)

    logits = predict_logits(model, public_x[release_positions])
    reference = None
    if has_fused and np.array_equal(fused_positions, release_positions):
        reference = fused
    s = config.shield
    knowledge, stats = shield(
        logits,
        temperature=s.temperature,
        gamma=s.gamma,
        noise_std=s.noise_std,
        scorer=s.scorer,
        reference=reference,
        top_k=s.top_k,
        rng=np.random.default_rng(seed),
    )
    metrics.update(
        {
            "num-examples": float(len(data.train)),
            "val-accuracy": accuracy(model, data.val),
            "shield-sensitivity": stats.mean_sensitivity,
            "shield-temperature": stats.mean_temperature,
            "shield-entropy": stats.mean_entropy,
        }
    )
    return SiteRound(knowledge, metrics)


def privacy_metrics(ledger: PrivacyLedger) -> dict[str, float]:
    """The ledger's state as metrics (numbers only, as Flower's MetricRecord requires)."""
    plan = ledger.plan
    return {
        "epsilon": ledger.epsilon(),
        "dp-target-epsilon": plan.target_epsilon,
        "dp-delta": plan.delta,
        "dp-noise-multiplier": plan.noise_multiplier,
        "dp-sample-rate": plan.sample_rate,
        "dp-steps": float(ledger.steps),
        "dp-planned-steps": float(plan.planned_steps),
    }


def evaluate_site(model: nn.Module, data: ClientData) -> dict[str, float]:
    """Accuracy on the site's own local test split."""
    return {"accuracy": accuracy(model, data.test), "num-examples": float(len(data.test))}
