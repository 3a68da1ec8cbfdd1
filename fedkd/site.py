"""What one site does in a round, as plain PyTorch/NumPy task code (no Flower).

A round at site i (DESIGN section 1, step 2):

a. *distil*: fit the model to the fused knowledge F_i on the public positions it covers;
b. *local train*: cross-entropy on the private train split, with DP-SGD through the
   site's :class:`~fedkd.privacy.PrivacyLedger` when ``privacy.enabled``
   (``train.mode = "joint"`` merges a and b into CE + kd_weight * KD per step; not under
   DP, where the public KD step stays outside the DP optimizer);
c. *extract*: logits on this round's public positions;
d. *shield*: per-example temperature and logit noise -> released knowledge K_i.

A *teacher site* (``teacher.sites``) also runs a larger teacher, such as a pretrained
MiniLM next to a tiny BERT student (:func:`teacher_steps`): only the teacher reads the
private data (fine-tuning, DP-SGD under privacy); the student learns from the teacher's
predictions and the fused knowledge on the public set; ``teacher.release`` names the
model that takes F_i, releases knowledge and is evaluated. See docs/text.md.

The Flower ClientApp in ``clients/`` only unpacks messages, calls these functions and
packs the replies.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fedkd.config import Config, ConfigError, PrivacyConfig
from fedkd.data import ArrayDataset, ClientData, FederatedSplit
from fedkd.distillation import accuracy, distil, predict_logits, train_joint, train_supervised
from fedkd.models import build_model
from fedkd.privacy import PrivacyConfigError, PrivacyLedger, PrivacyPlan, plan_privacy, train_private
from fedkd.shielding import shield
from fedkd.text import TextClassifier, frozen_embeddings


def site_seed(config: Config, client: int, round_number: int = 0) -> int:
    """Seed of client ``client`` in round ``round_number``: reproducible, distinct per site and round."""
    return (config.seed * 1_000_003 + client * 10_007 + round_number) % 2**31


def build_site_model(
    config: Config, split: FederatedSplit, client: int, *, architecture: str = ""
) -> nn.Module:
    """Site ``client``'s model: ``architecture`` (a site's own choice, node config
    ``model``) or its turn in ``model.architectures``; initial weights from its seed."""
    return build_model(
        architecture or config.architecture_for(client),
        input_shape=split.input_shape,
        num_classes=split.num_classes,
        seed=site_seed(config, client),
        **split.model_options,
    )


def build_site_teacher(config: Config, split: FederatedSplit, client: int) -> nn.Module | None:
    """Site ``client``'s teacher (``teacher.sites``), or None for a site without one."""
    name = config.teacher_for(client)
    if not name:
        return None
    return build_model(
        name,
        input_shape=split.input_shape,
        num_classes=split.num_classes,
        seed=(site_seed(config, client) + 1) % 2**31,
        **split.model_options,
    )


def site_privacy_plan(config: Config, train: ArrayDataset, client: int | None = None) -> PrivacyPlan:
    """The site's whole-run DP plan: (epsilon, delta) over ``num-server-rounds`` rounds of
    ``privacy.local-epochs`` epochs (``teacher.epochs`` on a teacher site, where the teacher
    is the only model that reads private data), noise multiplier calibrated once
    (fedkd.privacy)."""
    epochs = config.privacy.local_epochs
    if client is not None and config.teacher_for(client):
        epochs = config.teacher.epochs
    return _cached_plan(config.privacy, len(train), config.train.batch_size,
                        epochs, config.num_server_rounds)


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
            plans.append(site_privacy_plan(config, data.train, client))
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


def _seeded(round_fn):  # noqa: ANN001, ANN202
    """Run a site's round under torch's global RNG seeded from (seed, site, round), so
    dropout and the like are reproducible; the caller's RNG state is left untouched."""

    @functools.wraps(round_fn)
    def wrapper(**kwargs):  # noqa: ANN003, ANN202
        with torch.random.fork_rng():
            torch.manual_seed(site_seed(kwargs["config"], kwargs["client"], kwargs["round_number"]))
            return round_fn(**kwargs)

    return wrapper


def train_private_site(
    model: nn.Module, data: ArrayDataset, *, config: Config, ledger: PrivacyLedger, lr: float,
    seed: int,
):  # noqa: ANN201 (PrivateTrainResult)
    """DP-SGD on the site's private data with the config's Opacus settings: per-example
    gradients by ``privacy.grad-sample-mode`` ('auto': ghost clipping for text models),
    text embeddings frozen in the DP step when ``privacy.freeze-embeddings``."""
    p = config.privacy
    mode = p.grad_sample_mode
    if mode == "auto":
        mode = "ghost" if isinstance(model, TextClassifier) else "hooks"
    with frozen_embeddings(model, enabled=p.freeze_embeddings):
        return train_private(model, data, plan=ledger.plan, ledger=ledger, lr=lr, seed=seed,
                             grad_sample_mode=mode)


def teacher_steps(
    *,
    student: nn.Module,
    teacher: nn.Module,
    config: Config,
    seed: int,
    data: ClientData,
    public_x: np.ndarray,
    fused: np.ndarray | None,
    fused_positions: np.ndarray | None,
    ledger: PrivacyLedger | None,
    metrics: dict[str, float],
) -> nn.Module:
    """A teacher site's training; returns the released model (``teacher.release``).

    1. release = teacher only: the teacher distils F_i on the public set (free).
    2. The teacher trains on the private data: ``teacher.epochs`` epochs at ``teacher.lr``,
       DP-SGD through the site's ledger when privacy is on. It is the only model on the
       site that reads private data, so the site's one budget is the teacher's.
    3. The student distils on the whole public set towards
       p(x) = softmax(z_teacher(x) / T), mixed with F_i where the student is released:
       p(x) = w p_teacher(x) + (1 - w) F_i(x) (w = ``teacher.weight``) on the positions F_i
       covers. Public inputs and the DP-trained teacher only: post-processing, no privacy cost.
    """
    t, tc = config.train, config.teacher
    has_fused = fused is not None and fused_positions is not None and len(fused_positions) > 0
    release_teacher = tc.release == "teacher"
    if release_teacher and has_fused:
        metrics["distil-loss"] = distil(
            teacher, public_x[fused_positions], fused, epochs=tc.epochs, batch_size=t.batch_size,
            lr=tc.lr, temperature=t.kd_temperature, seed=seed,
        )
    if ledger is None:
        metrics["train-loss"] = train_supervised(
            teacher, data.train, epochs=tc.epochs, batch_size=t.batch_size, lr=tc.lr, seed=seed
        )
    else:
        private = train_private_site(teacher, data.train, config=config, ledger=ledger, lr=tc.lr, seed=seed)
        metrics.update(privacy_metrics(ledger))
        metrics["train-loss"] = private.loss
        metrics["dp-stopped"] = float(private.stopped)
        metrics["dp-round-steps"] = float(private.steps)
    logits = torch.as_tensor(predict_logits(teacher, public_x))
    target = torch.softmax(logits, dim=-1).numpy()
    mixed = has_fused and not release_teacher
    if mixed:
        target[fused_positions] = tc.weight * target[fused_positions] + (1 - tc.weight) * fused
    metrics["distil-loss" if mixed else "teacher-kd-loss"] = distil(
        student, public_x, target, epochs=t.distill_epochs, batch_size=t.batch_size, lr=t.lr,
        temperature=t.kd_temperature, seed=seed,
    )
    metrics["teacher-val-accuracy"] = accuracy(teacher, data.val)
    metrics["student-val-accuracy"] = accuracy(student, data.val)
    return teacher if release_teacher else student


@_seeded
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
    teacher: nn.Module | None = None,
) -> SiteRound:
    """Steps a-d above; ``fused`` [len(fused_positions), C] is F_i (None in round 1 or
    under fusion method ``none``). ``model`` (and ``ledger``) are updated in place.
    With a ``teacher`` (a teacher site) steps a-b are :func:`teacher_steps`, and c-d use
    the released model (``teacher.release``).

    With a ``ledger`` (privacy on) local training is DP-SGD and the metrics carry the
    run's epsilon so far; once the next round would exceed the target, the site stops
    private training (``dp-stopped`` = 1) and keeps releasing knowledge from its model."""
    t = config.train
    seed = site_seed(config, client, round_number)
    metrics: dict[str, float] = {}
    has_fused = fused is not None and fused_positions is not None and len(fused_positions) > 0
    if ledger is not None and t.mode == "joint":
        raise ValueError("train.mode 'joint' mixes public KD into the DP step; use 'sequential'")
    if teacher is not None:
        model = teacher_steps(
            student=model, teacher=teacher, config=config, seed=seed, data=data,
            public_x=public_x, fused=fused, fused_positions=fused_positions, ledger=ledger,
            metrics=metrics,
        )
    elif has_fused and t.mode == "joint":
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
            private = train_private_site(model, data.train, config=config, ledger=ledger,
                                         lr=config.privacy.lr, seed=seed)
            metrics.update(privacy_metrics(ledger))
            metrics["train-loss"] = private.loss
            metrics["dp-stopped"] = float(private.stopped)
            metrics["dp-round-steps"] = float(private.steps)

    logits = predict_logits(model, public_x[release_positions])
    reference = None
    if has_fused and np.array_equal(fused_positions, release_positions):
        reference = fused
    s = config.shield
    texts = None
    if s.scorer == "pii":  # the scorer reads the public inputs (token ids) as text
        from fedkd.text import detokenize

        texts = detokenize(public_x[release_positions], tokenizer=config.data.tokenizer)
    knowledge, stats = shield(
        logits,
        temperature=s.temperature,
        gamma=s.gamma,
        noise_std=s.noise_std,
        scorer=s.scorer,
        reference=reference,
        top_k=s.top_k,
        rng=np.random.default_rng(seed),
        texts=texts,
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


def evaluate_site(
    model: nn.Module, data: ClientData, *, teacher: nn.Module | None = None, release: str = "student"
) -> dict[str, float]:
    """Accuracy on the site's own local test split; on a teacher site the released model's
    (``release``), with ``student-accuracy`` and ``teacher-accuracy`` beside it."""
    if teacher is None:
        return {"accuracy": accuracy(model, data.test), "num-examples": float(len(data.test))}
    student_acc, teacher_acc = accuracy(model, data.test), accuracy(teacher, data.test)
    return {
        "accuracy": teacher_acc if release == "teacher" else student_acc,
        "num-examples": float(len(data.test)),
        "student-accuracy": student_acc,
        "teacher-accuracy": teacher_acc,
    }


# ------------------------------------------------------------------ a site's own settings
#
# Under Flower's deployment engine every SuperNode is started with its own node config
# (``flower-supernode --node-config 'partition-id=0 data-path="/srv/site-0.npz"'`` or a
# TOML file): which partition it holds, where its data is, which model it runs, where
# it keeps its state. Simulated sites get only ``partition-id`` (and ``num-partitions``).

NODE_CONFIG_KEYS = {
    "partition-id": "this site's id, 0..data.num-clients-1 (required)",
    "data-path": "the site's private data, an .npz file (fedkd deploy export-partitions writes one)",
    "public-path": "the public transfer set, an .npz file (the same file on every host)",
    "dataset": "rebuild the federation's split from this dataset instead of data.dataset",
    "dataset-path": "this host's copy of the dataset (save_to_disk folder) instead of data.path",
    "model": "this site's architecture instead of its turn in model.architectures",
    "state-dir": "folder where the site keeps its state after each round (rejoin, resume)",
    "num-partitions": "set by Flower's simulation engine; not used",
}


@dataclass(frozen=True)
class SiteSettings:
    """A site's node config, checked (see ``NODE_CONFIG_KEYS``)."""

    partition_id: int
    data_path: str = ""
    public_path: str = ""
    dataset: str = ""
    dataset_path: str = ""
    model: str = ""
    state_dir: str = ""

    @property
    def uses_local_files(self) -> bool:
        return bool(self.data_path or self.public_path or self.dataset or self.dataset_path)


def site_settings(node_config: Mapping[str, Any], *, num_clients: int) -> SiteSettings:
    """Check a node config; raise one :class:`ConfigError` listing every problem."""
    import difflib

    from fedkd.models import MODELS

    problems = []
    for key in node_config:
        if key not in NODE_CONFIG_KEYS:
            close = difflib.get_close_matches(key, NODE_CONFIG_KEYS, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            problems.append(f"node config {key}: unknown key{hint} (known: {', '.join(NODE_CONFIG_KEYS)})")
    value = node_config.get("partition-id")
    if value is None:
        problems.append("node config partition-id: required (which data partition this site holds)")
    elif isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) != int(value) \
            or not 0 <= int(value) < num_clients:
        problems.append(
            f"node config partition-id: must be an integer in 0..{num_clients - 1} "
            f"(data.num-clients is {num_clients}); got {value!r}"
        )
    strings = {}
    for key in ("data-path", "public-path", "dataset", "dataset-path", "model", "state-dir"):
        text = node_config.get(key, "")
        if not isinstance(text, str):
            problems.append(f"node config {key}: must be a string (quote it: {key}=\"...\"); got {text!r}")
        else:
            strings[key.replace("-", "_")] = text.strip()
    if strings.get("model") and strings["model"] not in MODELS.names():
        problems.append(f"node config model: must be one of {', '.join(MODELS.names())}; got {strings['model']!r}")
    if problems:
        raise ConfigError(problems)
    return SiteSettings(partition_id=int(value), **strings)


def load_site_split(config: Config, settings: SiteSettings) -> FederatedSplit:
    """:func:`_load_site_split`, and with ``audit.enabled`` the audited site's private data
    as the audit plan fixes it (candidates each kept w.p. 1/2, secret inserted;
    :func:`fedkd.audit.canaries.with_audit`)."""
    split = _load_site_split(config, settings)
    if config.audit.enabled and settings.partition_id == config.audit.site:
        from fedkd.audit.canaries import with_audit

        split = with_audit(config, split)
    return split


def _load_site_split(config: Config, settings: SiteSettings) -> FederatedSplit:
    """The data a site works with, from its settings.

    Without local-data keys: the federation's split rebuilt from the run config (the
    simulation's way). ``dataset``/``dataset-path`` rebuild it from this host's copy.
    ``public-path`` and ``data-path`` read the public set and the site's private data
    from files; with both, the site needs nothing else (no other site's data, no copy of
    the whole dataset). Whichever way, the train handler compares the public set's
    fingerprint with the server's and refuses to take part when they differ.
    """
    import dataclasses

    from fedkd.data import load_federation, load_public_file, load_site_file, site_view

    client = settings.partition_id
    if not settings.uses_local_files:
        return load_federation(config.data, config.seed)
    split = None
    if not (settings.public_path and settings.data_path):
        data_config = dataclasses.replace(
            config.data,
            dataset=settings.dataset or config.data.dataset,
            path=settings.dataset_path or (config.data.path if not settings.dataset else ""),
        )
        split = load_federation(data_config, config.seed)
    if settings.public_path:
        public, num_classes = load_public_file(settings.public_path)
    else:
        public, num_classes = split.public, split.num_classes
    if settings.data_path:
        d = config.data
        data = load_site_file(
            settings.data_path, partition_id=client, num_classes=num_classes,
            input_shape=tuple(public.x.shape[1:]), val_fraction=d.val_fraction,
            local_test_fraction=d.local_test_fraction, seed=site_seed(config, client),
        )
    else:
        data = split.clients[client]
    text = None
    if split is not None:
        text = split.text
    else:
        from fedkd.text import is_text_dataset, vocab_info

        if is_text_dataset(config.data.dataset):  # token ids: the model needs the vocabulary
            text = vocab_info(config.data.tokenizer)
    return site_view(public=public, client=client, data=data, num_classes=num_classes, text=text)
