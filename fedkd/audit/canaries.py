"""Which of the target site's private examples an audit is about, and the text secret.

With ``audit.enabled`` the target site (``audit.site``) trains on a modified private set,
fixed by the run's seed so that the site, the server and a later ``fedkd audit`` all
derive the same one:

* **Candidates**: ``audit.canaries`` examples of the site's train split (0 = all of
  them). Each is *included* independently with probability 1/2 (the Bernoulli mask of
  Steinke et al. 2023); excluded candidates are removed from the site's training data, so
  members and non-members come from the same distribution (the site's own). With
  ``audit.canary-labels = "mislabeled"`` every candidate carries a random wrong label
  (crafted canaries, the usual choice for auditing DP: an example that disagrees with
  the rest of the data is the one a model must memorise to fit).
* **Secret** (text data, ``audit.secret-repeats`` = k > 0; Carlini et al. 2019): the
  format ``audit.secret-format`` filled with random digits, labelled
  ``audit.secret-label``, inserted k times. A second filling, never inserted, is the
  control. A classifier sees the secret only through its label, and k copies of one
  format with one label teach "this format -> this label" for *every* filling (no
  exposure to measure). So ``audit.secret-decoys`` other fillings are inserted once each
  with a random other label, as a corpus holds many pins: to fit them the model has to
  learn which digits go with the secret's label, i.e. memorise the secret.

Candidates keep their global ids; secret copies get ids -1, ..., -k, decoys -(k+1), ... .
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from fedkd.audit.exposure import fill, format_slots
from fedkd.config import Config, ConfigError
from fedkd.data import ArrayDataset, ClientData, FederatedSplit


@dataclass(frozen=True)
class AuditPlan:
    """The target site's audit candidates (positions in its original train split), the
    labels they are trained with, the inclusion bits, and the secrets (digits; empty
    tuples without a secret)."""

    site: int
    positions: np.ndarray
    labels: np.ndarray
    included: np.ndarray
    secret: tuple[int, ...]
    control: tuple[int, ...]
    decoys: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 0), np.int64))
    decoy_labels: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            "site": np.int64(self.site), "positions": self.positions, "labels": self.labels,
            "included": self.included, "secret": np.asarray(self.secret, np.int64),
            "control": np.asarray(self.control, np.int64), "decoys": self.decoys,
            "decoy_labels": self.decoy_labels,
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> AuditPlan:
        extra = {k: arrays[k] for k in ("decoys", "decoy_labels") if k in arrays}
        return cls(int(arrays["site"]), arrays["positions"], arrays["labels"],
                   arrays["included"].astype(bool), tuple(int(d) for d in arrays["secret"]),
                   tuple(int(d) for d in arrays["control"]), **extra)

    @property
    def decoy_tuples(self) -> list[tuple[int, ...]]:
        return [tuple(int(d) for d in row) for row in self.decoys]


def audit_plan(config: Config, train: ArrayDataset, *, num_classes: int, text: bool) -> AuditPlan:
    """The plan for the target site's original ``train`` split (module doc); refuses, with
    one :class:`ConfigError`, more candidates than the site holds."""
    a = config.audit
    n = len(train)
    count = a.canaries or n
    if count > n or n < 2:
        raise ConfigError([
            f"audit.canaries: site {a.site} has {n} private training examples; asked for "
            f"{count} candidates (use at most {n}, or 0 for all of them)"
        ])
    rng = np.random.default_rng([config.seed, a.site, 5151])
    positions = np.sort(rng.choice(n, count, replace=False))
    labels = train.y[positions].copy()
    if a.canary_labels == "mislabeled":
        labels = (labels + rng.integers(1, num_classes, count)) % num_classes
    included = rng.random(count) < 0.5
    secret = control = ()
    decoys, decoy_labels = np.zeros((0, 0), np.int64), np.zeros(0, np.int64)
    if text and a.secret_repeats > 0:
        slots = format_slots(a.secret_format)
        secret = tuple(int(d) for d in rng.integers(0, 10, slots))
        control = secret
        while control == secret:
            control = tuple(int(d) for d in rng.integers(0, 10, slots))
        if a.secret_label >= num_classes:
            raise ConfigError([f"audit.secret-label: must be < the number of classes ({num_classes}); "
                               f"got {a.secret_label}"])
        wanted = min(a.secret_decoys, 10**slots - 2)
        chosen: list[tuple[int, ...]] = []
        while len(chosen) < wanted:
            d = tuple(int(v) for v in rng.integers(0, 10, slots))
            if d not in (secret, control) and d not in chosen:
                chosen.append(d)
        decoys = np.asarray(chosen, np.int64).reshape(len(chosen), slots)
        decoy_labels = (a.secret_label + rng.integers(1, num_classes, len(chosen))) % num_classes
    return AuditPlan(a.site, positions, labels.astype(np.int64), included, secret, control,
                     decoys, decoy_labels.astype(np.int64))


def secret_inputs(config: Config, digits_list: list[tuple[int, ...]]) -> np.ndarray:
    """Token ids [n, L] of the secret format filled with each digits tuple."""
    from fedkd.data.text import tokenize

    texts = [fill(config.audit.secret_format, d) for d in digits_list]
    return tokenize(texts, max_length=config.data.max_length, tokenizer=config.data.tokenizer)


def audited_train(config: Config, train: ArrayDataset, plan: AuditPlan) -> ArrayDataset:
    """The site's training data under the plan: non-candidates, included candidates (with
    their audit labels) and k copies of the secret."""
    keep = np.ones(len(train), dtype=bool)
    keep[plan.positions] = False
    members = plan.positions[plan.included]
    x = [train.x[keep], train.x[members]]
    y = [train.y[keep], plan.labels[plan.included]]
    ids = [train.ids[keep], train.ids[members]]
    k = config.audit.secret_repeats
    if plan.secret and k > 0:
        x.append(np.repeat(secret_inputs(config, [plan.secret]), k, axis=0))
        y.append(np.full(k, config.audit.secret_label, dtype=np.int64))
        ids.append(-np.arange(1, k + 1, dtype=np.int64))
        if len(plan.decoys):
            x.append(secret_inputs(config, plan.decoy_tuples))
            y.append(plan.decoy_labels)
            ids.append(-np.arange(k + 1, k + 1 + len(plan.decoys), dtype=np.int64))
    return ArrayDataset(np.concatenate(x), np.concatenate(y), np.concatenate(ids))


def with_audit(config: Config, split: FederatedSplit) -> FederatedSplit:
    """``split`` with the target site's train split replaced by :func:`audited_train`
    (unchanged when auditing is off or the split does not hold the target site)."""
    a = config.audit
    if not a.enabled:
        return split
    clients = split.clients
    try:
        data = clients[a.site]
    except (IndexError, KeyError):
        return split  # a site view of another site
    plan = audit_plan(config, data.train, num_classes=split.num_classes, text=split.text is not None)
    audited = dataclasses.replace(data, train=audited_train(config, data.train, plan))
    if isinstance(clients, dict):
        new_clients = {**clients, a.site: audited}
    else:
        new_clients = tuple(audited if i == a.site else c for i, c in enumerate(clients))
    return dataclasses.replace(split, clients=new_clients)


def plan_for(config: Config, split: FederatedSplit) -> AuditPlan:
    """The plan of ``config``'s target site in the original (un-audited) ``split``."""
    data: ClientData = split.clients[config.audit.site]
    return audit_plan(config, data.train, num_classes=split.num_classes, text=split.text is not None)
