"""What one site does in a round, as plain PyTorch/NumPy task code (no Flower).

A round at site i (DESIGN section 1, step 2):

a. *distil*: fit the model to the fused knowledge F_i on the public positions it covers;
b. *local train*: cross-entropy on the private train split
   (``train.mode = "joint"`` merges a and b into CE + kd_weight * KD per step);
c. *extract*: logits on this round's public positions;
d. *shield*: per-example temperature and logit noise -> released knowledge K_i.

The Flower ClientApp in ``clients/`` only unpacks messages, calls these functions and
packs the replies.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import nn

from fedkd.config import Config
from fedkd.data import ClientData, FederatedSplit
from fedkd.distillation import accuracy, distil, predict_logits, train_joint, train_supervised
from fedkd.models import build_model
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
) -> SiteRound:
    """Steps a-d above; ``fused`` [len(fused_positions), C] is F_i (None in round 1 or
    under fusion method ``none``). ``model`` is updated in place."""
    t = config.train
    seed = site_seed(config, client, round_number)
    metrics: dict[str, float] = {}
    has_fused = fused is not None and fused_positions is not None and len(fused_positions) > 0
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
        metrics["train-loss"] = train_supervised(
            model, data.train, epochs=t.local_epochs, batch_size=t.batch_size, lr=t.lr, seed=seed
        )

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


def evaluate_site(model: nn.Module, data: ClientData) -> dict[str, float]:
    """Accuracy on the site's own local test split."""
    return {"accuracy": accuracy(model, data.test), "num-examples": float(len(data.test))}
