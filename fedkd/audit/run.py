"""Audit a finished run: membership inference on the target site's candidates through
three things an adversary may hold, canary exposure for text, and the one-run epsilon
lower bound beside the accountant's epsilon.

Threat models and targets (docs/audit.md):

* ``released-knowledge`` (honest-but-curious server; it sees every K_i^r, r = 1..R).
  Knowledge is soft predictions on the *public* inputs, so it says nothing directly about
  a private example x. The server can still turn it into a model: distil a surrogate
  f_s on {(p, K_i^r(p)) : p in P_r, all rounds r} (KD at T = 1, the site's architecture)
  and score the candidates with f_s. Whatever membership signal survives fitting on
  public inputs, shielding and DP shows up in f_s.
* ``site-model`` (the site's final model, e.g. a stolen or released site model): scored
  directly. Not protected by shielding (shielding changes only what is released).
* ``global-student`` (a curious site that receives the server's student): scored directly.

Attacks (:mod:`fedkd.audit.attacks`): LOSS and the trained attacks (``trained-rf``,
``trained-gb``; cross-fitted over ``audit.attack-folds`` folds of the known inclusion bits)
on every target; LiRA (offline and online) and RMIA (offline with ``audit.rmia-offline-a``,
and online; population: the global test split) on ``site-model`` and
``released-knowledge`` with ``audit.reference-models`` reference models trained by fedkd's
own training code (``train_supervised``, or DP-SGD through ``train_private`` with the
site's privacy plan when the run used DP) on the site's non-candidate data plus a random
half of the candidates; for ``released-knowledge`` each reference model's knowledge on P
is shielded with the run's settings and distilled into a reference surrogate, as the
attacker does with the target. The references skip the federated distillation steps the
site also ran (an approximation: they are trained like a local-only site).

Strongest per target: :func:`fedkd.audit.metrics.strongest_attack` (rule
:data:`fedkd.audit.metrics.STRONGEST_RULE`), its intervals also given at the Bonferroni
level for the number of attacks tried.

One-run bound: :func:`fedkd.audit.one_run.one_run_audit` on each (target, attack)'s scores
of the candidates, whose inclusion bits are the Bernoulli(1/2) mask; each bound holds
at ``audit.confidence`` on its own (the largest over targets and attacks is reported with
that caveat), except the trained attacks' (their guesses use other candidates' inclusion
bits). The accountant's epsilon is the audited site's from the run's ledger.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedkd.audit.attacks import ATTACKS, NEEDS, log_prob_of_label, reference_masks
from fedkd.audit.canaries import AuditPlan, secret_inputs, with_audit
from fedkd.audit.exposure import candidate_fillings, exposure_by_rank, exposure_by_skewnorm
from fedkd.audit.metrics import STRONGEST_RULE, attack_metrics, simultaneous_confidence, strongest_attack
from fedkd.audit.one_run import one_run_audit
from fedkd.audit.store import AuditDataError, load_plan, load_released, load_site_state_arrays
from fedkd.config import Config, load_config
from fedkd.data import ArrayDataset, FederatedSplit, load_federation
from fedkd.distillation import distil, predict_logits, train_supervised
from fedkd.reporting import read_events, read_summary

SURROGATE_PASSES = 30
"""Passes over the public set when the attacker distils released knowledge into a surrogate."""

THREAT_MODELS = {
    "released-knowledge": "honest-but-curious server: every knowledge array the site released, "
                          "distilled into a surrogate",
    "site-model": "the site's final model (stolen or published); under DP with a site student, "
                  "the DP-trained model whose predictions the site releases",
    "site-student": "a DP site's public-set student (privacy.student), the model it reports "
                    "and keeps: distilled from its DP model and the server's consensus on public "
                    "inputs (post-processing); LOSS and the trained attacks (no reference students)",
    "global-student": "curious site: the server's global student",
}


@dataclass
class AuditInputs:
    """Everything loaded from a run directory."""

    run_dir: Path
    config: Config
    summary: dict
    split: FederatedSplit
    plan: AuditPlan
    x: np.ndarray  # candidates' inputs
    released: list[tuple[int, np.ndarray, np.ndarray]]
    models: dict[str, nn.Module] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def _site_model(config: Config, split: FederatedSplit, site: int, seed_offset: int = 0) -> nn.Module:
    """The audited site's released model (student, or teacher under ``teacher.release =
    teacher``) as built for the run; ``seed_offset`` != 0 gives other initial weights."""
    from fedkd.models import build_model
    from fedkd.seeds import site_seed

    teacher = config.teacher_for(site)
    name = teacher if teacher and config.teacher.release == "teacher" else config.architecture_for(site)
    seed = site_seed(config.seed, site) + (1 if teacher and name == teacher else 0)
    return build_model(name, input_shape=split.input_shape, num_classes=split.num_classes,
                       seed=(seed + seed_offset) % 2**31, **split.model_options)


def _load_state(model: nn.Module, arrays: dict[str, np.ndarray]) -> nn.Module:
    model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()})
    return model


def load_inputs(run_dir: str | Path, overrides: dict[str, Any] | None = None) -> AuditInputs:
    """Read a finished run recorded with ``audit.enabled`` (clear errors otherwise);
    ``overrides`` change audit-time settings of its config."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").is_file():
        raise AuditDataError(f"{run_dir} is not a fedkd run directory (no config.toml)")
    summary = read_summary(run_dir)
    config = load_config(run_dir / "config.toml", overrides=overrides)
    plan, x, _ = load_plan(run_dir)
    split = load_federation(config.data, config.seed)
    released = load_released(run_dir)
    inputs = AuditInputs(run_dir, config, summary, split, plan, x, released)
    site = plan.site

    record = "teacher" if config.teacher_for(site) and config.teacher.release == "teacher" else "model"
    state_dir = config.checkpoint.site_state_dir or str(run_dir / "site-state")
    arrays = load_site_state_arrays(state_dir, run_name=config.run_name, site=site, record=record)
    if arrays is None:
        inputs.skipped["site-model"] = (
            f"no saved state of site {site} under {state_dir} (run with "
            "checkpoint.site-state-dir set, as fedkd simulate does)"
        )
    else:
        inputs.models["site-model"] = _load_state(_site_model(config, split, site), arrays)

    student = load_site_state_arrays(state_dir, run_name=config.run_name, site=site, record="student") \
        if arrays is not None else None
    if student is not None:
        inputs.models["site-student"] = _load_state(_site_model(config, split, site), student)
    else:
        inputs.skipped["site-student"] = ("the site kept no DP student (privacy.student is off, "
                                          "privacy is off, or it is a teacher site)")

    if config.global_student.enabled:
        from fedkd.checkpoint import CheckpointError, read_server_checkpoint
        from fedkd.models import build_model

        try:
            _, ckpt, _ = read_server_checkpoint(run_dir)
            student = {k[len("student/"):]: v for k, v in ckpt.items() if k.startswith("student/")}
            g = config.global_student
            model = build_model(g.model, input_shape=split.input_shape, num_classes=split.num_classes,
                                seed=config.seed, **split.model_options)
            inputs.models["global-student"] = _load_state(model, student)
        except (CheckpointError, RuntimeError) as err:
            inputs.skipped["global-student"] = f"no global student in the checkpoint ({err})"
    else:
        inputs.skipped["global-student"] = "global-student.enabled is false in this run"
    if not released:
        inputs.skipped["released-knowledge"] = f"no released knowledge of site {site} was recorded"
    return inputs


# ------------------------------------------------------------------ surrogate and references


def release(config: Config, logits: np.ndarray, *, rng: np.random.Generator,
            inputs: np.ndarray | None = None) -> np.ndarray:
    """What the server would see from the site for ``logits``: the site's own release step
    (:func:`fedkd.federation.site.release_knowledge`: the run's shielding), packed in the
    run's wire format (``knowledge.wire-format``, ``shield.top-k``) and decoded as the server
    decodes it (rows summing to 1)."""
    from fedkd.federation.server import accept_reply
    from fedkd.federation.site import release_knowledge
    from fedkd.wire import REPLY_RECORDS, site_record

    probs, _ = release_knowledge(config, logits, rng=rng, public_x=inputs)
    num_classes = probs.shape[1]
    wire = site_record({"knowledge": probs}, num_classes=num_classes, wire_format=config.knowledge.wire_format,
                       top_k=config.shield.top_k)
    return accept_reply(config=config, num_classes=num_classes, release=np.arange(len(probs)),
                        record_names=REPLY_RECORDS, arrays=wire)


def distil_surrogate(config: Config, split: FederatedSplit, site: int,
                     releases: list[tuple[np.ndarray, np.ndarray]], *, seed: int) -> nn.Module:
    """The attacker's surrogate: the site's architecture (fresh weights) distilled at T = 1
    on every recorded (public positions, knowledge) pair, ~``SURROGATE_PASSES`` passes."""
    model = _site_model(config, split, site, seed_offset=7777 + seed)
    x = np.concatenate([split.public.x[pos] for pos, _ in releases])
    k = np.concatenate([kn for _, kn in releases]).astype(np.float32)
    epochs = max(1, math.ceil(SURROGATE_PASSES / len(releases)))
    distil(model, x, k, epochs=epochs, batch_size=config.train.batch_size, lr=config.train.lr,
           temperature=1.0, seed=seed)
    return model


def train_like_site(config: Config, model: nn.Module, data: ArrayDataset, *, site: int, seed: int) -> None:
    """Train ``model`` on ``data`` as the site trains on its private data over the whole
    run (without the federated distillation steps): DP-SGD with the site's plan
    (``privacy.local-epochs`` a round at ``privacy.lr``) for ``num-server-rounds`` rounds
    when privacy is on, else ``audit.reference-epochs``
    (default rounds x local epochs) epochs of Adam."""
    t = config.train
    if config.privacy.enabled:
        from fedkd.privacy import PrivacyLedger
        from fedkd.privacy import site_privacy_plan, train_private_site

        ledger = PrivacyLedger(site_privacy_plan(config, len(data), site))
        for r in range(config.num_server_rounds):
            train_private_site(model, data, config=config, ledger=ledger, lr=config.privacy.lr,
                               seed=seed * 1000 + r)
        return
    epochs = config.audit.reference_epochs or config.num_server_rounds * t.local_epochs
    train_supervised(model, data, epochs=epochs, batch_size=t.batch_size, lr=t.lr, seed=seed)


@dataclass
class References:
    """The reference models' predictions: ``in_mask`` [R, m] (which candidates each
    trained on), ``candidates`` {target: logits [R, m, C]} and ``population`` {target:
    logits [R, P, C]} on the population (the global test split, :func:`population`)."""

    in_mask: np.ndarray
    candidates: dict[str, np.ndarray]
    population: dict[str, np.ndarray]


def population(split: FederatedSplit) -> ArrayDataset:
    """RMIA's population samples z: the federation's global test split, which neither the
    target nor any reference model trained on."""
    return split.test


def reference_logits(inputs: AuditInputs, *, progress: bool) -> References:
    """The reference models (LiRA and RMIA) and their predictions on the candidates and
    the population."""
    from tqdm import tqdm

    config, split, plan = inputs.config, inputs.split, inputs.plan
    num = config.audit.reference_models
    site = plan.site
    original = split.clients[site].train
    keep = np.ones(len(original), dtype=bool)
    keep[plan.positions] = False
    audited = with_audit(config, split).clients[site].train
    secret = audited.subset(np.flatnonzero(audited.ids < 0))  # the inserted secret copies
    masks = reference_masks(num_models=num, pool_size=len(plan.positions), seed=config.seed)
    pop_x = population(split).x
    out: dict[str, list[np.ndarray]] = {"site-model": [], "released-knowledge": []}
    pop: dict[str, list[np.ndarray]] = {"site-model": [], "released-knowledge": []}
    for r in tqdm(range(num), desc="reference models", disable=not progress, leave=False):
        chosen = plan.positions[masks[r]]
        data = ArrayDataset(
            np.concatenate([original.x[keep], original.x[chosen], secret.x]),
            np.concatenate([original.y[keep], plan.labels[masks[r]], secret.y]),
            np.concatenate([original.ids[keep], original.ids[chosen], secret.ids]),
        )
        with torch.random.fork_rng():
            torch.manual_seed(config.seed * 101 + r)
            model = _site_model(config, split, site, seed_offset=1 + r)
            train_like_site(config, model, data, site=site, seed=config.seed + 17 * (r + 1))
            out["site-model"].append(predict_logits(model, inputs.x))
            pop["site-model"].append(predict_logits(model, pop_x))
            if inputs.released:
                positions = inputs.released[-1][1]
                knowledge = release(config, predict_logits(model, split.public.x[positions]),
                                    rng=np.random.default_rng([config.seed, r, 99]),
                                    inputs=split.public.x[positions])
                surrogate = distil_surrogate(config, split, site, [(positions, knowledge)], seed=100 + r)
                out["released-knowledge"].append(predict_logits(surrogate, inputs.x))
                pop["released-knowledge"].append(predict_logits(surrogate, pop_x))
    return References(masks, {k: np.stack(v) for k, v in out.items() if v},
                      {k: np.stack(v) for k, v in pop.items() if v})


# ------------------------------------------------------------------ exposure


def release_is_random(config: Config) -> bool:
    """Whether the run's release step draws randomness (logit noise or randomized response;
    ``withhold`` is deterministic):
    then one release is a random variable, and its exposure is averaged over draws."""
    return config.shield.noise_std > 0 or config.shield.release == "label-rr"


def secret_exposure(inputs: AuditInputs, models: dict[str, nn.Module]) -> dict[str, Any]:
    """Exposure of the inserted secret and of the never-inserted control, per model, and
    through the release mechanism on probe inputs: the site's final model's predictions
    released as the run releases its knowledge, as if the attacker had placed the probes
    (the secret, the control and the random fillings) in the public set (redacted as the
    public set is, ``data.public-redact``).

    Two release channels. ``release-on-probes``: one round's release. ``release-on-probes-
    all-rounds`` (random releases only: a deterministic one repeats the same row): every round
    the site released in (R = ``len(inputs.released)``), the
    attacker summing the R per-round losses -log p_r(label) (for one-hot releases, ranking
    by how often the secret's label came out), each round drawn from the final model (the
    only model the audit has). When the release is random (:func:`release_is_random`) one
    draw is a random variable, not a property of the mechanism: at label-rr eps 1 with 6
    classes the secret's label comes out with probability 0.35, and a single draw reads
    either ~4 bits or under 1. So each channel's exposure is the mean over
    ``audit.release-draws`` independent draws (Carlini et al. 2019 define exposure for a
    fixed model; its expectation over the mechanism's coins is what the mechanism
    guarantees to lower), with the 5% / 95% quantiles of the draws beside it."""
    config, plan = inputs.config, inputs.plan
    a = config.audit
    fills, space = candidate_fillings(fmt=a.secret_format,
                                      exclude=[plan.secret, plan.control, *plan.decoy_tuples],
                                      max_candidates=a.exposure_candidates, seed=config.seed)
    x = secret_inputs(config, [plan.secret, plan.control, *fills])
    labels = np.full(len(x), a.secret_label, dtype=np.int64)

    def measure(loss: np.ndarray) -> dict[str, dict[str, float]]:
        skew = exposure_by_skewnorm(canary_loss=loss[:2], candidate_losses=loss[2:])  # one fit for both
        return {which: {
            "rank": exposure_by_rank(canary_loss=loss[index], candidate_losses=loss[2:], space_size=space),
            "skewnorm": float(skew[index]),
            "loss": float(loss[index]),
        } for which, index in (("secret", 0), ("control", 1))}

    result: dict[str, Any] = {"space": space, "candidates": len(fills), "repeats": a.secret_repeats,
                              "decoys": int(len(plan.decoys)),
                              "format": a.secret_format, "label": a.secret_label, "targets": {}}
    for name, model in models.items():
        result["targets"][name] = measure(-log_prob_of_label(predict_logits(model, x), labels))
    if "site-model" not in models:
        return result
    probes = x
    if config.data.public_redact != "none":  # probes placed in the public set are redacted like it
        from fedkd.data.sources import redact_public

        probes = redact_public(x, config.data)
    logits = predict_logits(models["site-model"], probes)
    random = release_is_random(config)
    draws = a.release_draws if random else 1
    # a channel's rounds; reading every round adds nothing when each round's release is the same
    channels = {"release-on-probes": 1}
    if random and len(inputs.released) > 1:
        channels["release-on-probes-all-rounds"] = len(inputs.released)
    per_draw: dict[str, list[dict]] = {name: [] for name in channels}
    for d in range(draws):
        losses = [
            -np.log(np.clip(release(config, logits, rng=np.random.default_rng([config.seed, 4242, d, r]),
                                    inputs=probes)[np.arange(len(x)), labels], 1e-12, 1.0))
            for r in range(max(channels.values()))
        ]
        for name, rounds in channels.items():
            per_draw[name].append(measure(np.sum(losses[:rounds], axis=0)))
    for name, entries in per_draw.items():
        result["targets"][name] = {
            which: {
                **{key: float(np.mean([e[which][key] for e in entries])) for key in ("rank", "skewnorm", "loss")},
                "rank-q05": float(np.quantile([e[which]["rank"] for e in entries], 0.05)),
                "rank-q95": float(np.quantile([e[which]["rank"] for e in entries], 0.95)),
                "draws": draws, "rounds": channels[name],
            } for which in ("secret", "control")
        }
    return result


# ------------------------------------------------------------------ the audit


def _accuracy(inputs: AuditInputs) -> dict[str, float | None]:
    final = inputs.summary.get("final", {})
    site_evals = [e for e in read_events(inputs.run_dir, "client-eval") if e["client"] == inputs.plan.site]
    return {
        "alma": final.get("alma"),
        "global": final.get("global-accuracy"),
        "site": site_evals[-1]["accuracy"] if site_evals else None,
    }


def _privacy(inputs: AuditInputs) -> dict[str, Any]:
    ledger = inputs.summary.get("privacy", {}).get("ledger", {}).get(str(inputs.plan.site))
    release = {key: ledger[key] for key in ("release", "release-epsilon", "combined-epsilon", "combined-delta")
               if ledger is not None and key in ledger}
    if not inputs.config.privacy.enabled or ledger is None or "epsilon-spent" not in ledger:
        return {"enabled": False, "epsilon": None, "delta": None, **release}
    return {"enabled": True, "epsilon": ledger["epsilon-spent"], "delta": ledger["delta"],
            "target-epsilon": ledger["target-epsilon"], "accountant": ledger.get("accountant"),
            "certified-by": ledger.get("certified-by"), **release}


def attack_names(*, target: str, references: References | None, population_size: int,
                 included: np.ndarray, folds: int) -> list[str]:
    """The attacks that can run on ``target``: LOSS always; LiRA with reference models;
    RMIA with references and a population; the trained attacks when both members and
    non-members number at least ``folds``."""
    have = set()
    if references is not None and target in references.candidates:
        have.add("references")
        if population_size > 0 and target in references.population:
            have.add("population")
    if min(int(included.sum()), int((~included).sum())) >= folds:
        have.add("membership")
    return [n for n in ("loss", "lira-offline", "lira-online", "rmia", "rmia-online", "trained-rf", "trained-gb")
            if NEEDS[n] <= have]


def target_attacks(
    *, logits: np.ndarray, labels: np.ndarray, included: np.ndarray, references: References | None,
    target: str, population_logits: np.ndarray, population_labels: np.ndarray, config: Config,
    delta: float, scores_out: dict[str, np.ndarray],
) -> dict[str, Any]:
    """Every applicable attack's metrics on one target (and its one-run bound, except for
    the trained attacks: their guesses use other candidates' inclusion bits, which the
    one-run theorem's guesser does not see); each attack's scores go into ``scores_out``
    under ``"<target>/<attack>"``."""
    a = config.audit
    inputs: dict[str, Any] = {
        "logits": logits, "labels": labels, "membership": included, "folds": a.attack_folds,
        "seed": config.seed, "offline_a": a.rmia_offline_a,
        "population_logits": population_logits, "population_labels": population_labels,
    }
    if references is not None:
        inputs.update(in_mask=references.in_mask, reference_logits=references.candidates.get(target),
                      population_reference_logits=references.population.get(target))
    out = {}
    for attack in attack_names(target=target, references=references, population_size=len(population_labels),
                               included=included, folds=a.attack_folds):
        s = ATTACKS.get(attack)(**inputs)
        scores_out[f"{target}/{attack}"] = s
        metrics = attack_metrics(scores=s, labels=included, num_bootstrap=a.bootstrap,
                                 confidence=a.confidence, seed=config.seed)
        bound = None if "membership" in NEEDS[attack] else \
            one_run_audit(scores=s, included=included, delta=delta, confidence=a.confidence).to_dict()
        out[attack] = {**metrics.to_dict(), "one-run": bound}
    return out


def strongest(attacks: dict[str, Any], *, labels: np.ndarray, scores: dict[str, np.ndarray],
              config: Config) -> dict[str, Any]:
    """The strongest attack on a target (:func:`fedkd.audit.metrics.strongest_attack`) with
    its intervals re-computed at the Bonferroni level for the number of attacks tried."""
    a = config.audit
    best = strongest_attack(attacks=attacks)
    level = simultaneous_confidence(confidence=a.confidence, num_attacks=len(attacks))
    joint = attack_metrics(scores=scores[best], labels=labels, num_bootstrap=a.bootstrap,
                           confidence=level, seed=config.seed)
    m = attacks[best]
    return {"attack": best, "of": len(attacks), "auc": m["auc"], "auc_ci": m["auc_ci"],
            "tpr_at_1pct": m["tpr_at_1pct"], "tpr_at_1pct_ci": m["tpr_at_1pct_ci"],
            "simultaneous-confidence": level, "auc_ci_simultaneous": joint.auc_ci,
            "tpr_at_1pct_ci_simultaneous": joint.tpr_at_1pct_ci}


AUDIT_TIME_KEYS = ("audit.reference-models", "audit.reference-epochs", "audit.exposure-candidates",
                   "audit.release-draws",
                   "audit.bootstrap", "audit.confidence", "audit.attack-folds", "audit.rmia-offline-a")
"""Settings an audit of a finished run may change (the rest fixed what the run did)."""


def audit_run(
    run_dir: str | Path, *, overrides: dict[str, Any] | None = None, progress: bool = True,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Audit the run in ``run_dir``; returns ``(result, scores)``: the JSON-able result
    (see docs/audit.md) and every attack's candidate scores (``"<target>/<attack>"``)
    plus ``"labels"`` (inclusion bits) for ROC plots. ``overrides`` may change the keys in
    :data:`AUDIT_TIME_KEYS`. Runs with one torch thread (small models: faster, and fair to
    other processes); the caller's setting is restored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _audit_run(Path(run_dir), dict(overrides or {}), progress)
    finally:
        torch.set_num_threads(threads)


def _audit_run(run_dir: Path, overrides: dict[str, Any], progress: bool) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    from fedkd.config import ConfigError

    wrong = sorted(set(overrides) - set(AUDIT_TIME_KEYS))
    if wrong:
        raise ConfigError([f"{key}: cannot change when auditing a finished run (the run fixed it); "
                           f"an audit may set {', '.join(AUDIT_TIME_KEYS)}" for key in wrong])
    started = time.monotonic()
    inputs = load_inputs(run_dir, overrides)
    config, plan = inputs.config, inputs.plan
    a = config.audit
    if inputs.released:
        inputs.models["released-knowledge"] = distil_surrogate(
            config, inputs.split, plan.site, [(pos, kn) for _, pos, kn in inputs.released], seed=0)
    privacy = _privacy(inputs)
    delta = privacy["delta"] if privacy["enabled"] else 1.0 / (10 * max(1, len(plan.positions)))
    ref_targets = {"site-model", "released-knowledge"} & set(inputs.models)
    refs = reference_logits(inputs, progress=progress) if a.reference_models > 0 and ref_targets else None
    pop = population(inputs.split)

    scores: dict[str, np.ndarray] = {"labels": plan.included.astype(np.int64)}
    targets: dict[str, Any] = {}
    for name in THREAT_MODELS:
        if name not in inputs.models:
            targets[name] = {"threat-model": THREAT_MODELS[name], "skipped": inputs.skipped.get(name, "")}
            continue
        attacks = target_attacks(
            logits=predict_logits(inputs.models[name], inputs.x), labels=plan.labels,
            included=plan.included, references=refs, target=name,
            population_logits=predict_logits(inputs.models[name], pop.x), population_labels=pop.y,
            config=config, delta=delta, scores_out=scores,
        )
        targets[name] = {"threat-model": THREAT_MODELS[name], "attacks": attacks,
                         "strongest": strongest(attacks, labels=plan.included,
                                                scores={n: scores[f"{name}/{n}"] for n in attacks}, config=config)}

    result: dict[str, Any] = {
        "run": str(inputs.run_dir),
        "site": plan.site,
        "candidates": int(len(plan.positions)),
        "members": int(plan.included.sum()),
        "canary-labels": a.canary_labels,
        "reference-models": a.reference_models if refs is not None else 0,
        "population": int(len(pop)),
        "attack-folds": a.attack_folds,
        "strongest-rule": STRONGEST_RULE,
        "rounds-released": len(inputs.released),
        "privacy": privacy,
        "shield": dataclasses.asdict(config.shield),
        "accuracy": _accuracy(inputs),
        "targets": targets,
    }
    bounds = [(att["one-run"]["epsilon_lower_bound"], f"{t}/{n}") for t, v in targets.items()
              for n, att in v.get("attacks", {}).items() if att["one-run"] is not None]
    result["epsilon-lower-bound"] = {"max": max(bounds)[0] if bounds else 0.0,
                                     "where": max(bounds)[1] if bounds else None}
    if plan.secret:
        result["exposure"] = secret_exposure(inputs, {k: m for k, m in inputs.models.items()})
    result["seconds"] = time.monotonic() - started
    return result, scores
