"""The one validated configuration of a fedkd run.

A run is configured by nested TOML tables with kebab-case keys (the same shape as
Flower's ``[tool.flwr.app.config]``, which Flower flattens to ``"fusion.method"`` style
keys). :func:`load_config` accepts either form plus ``--set key=value`` overrides, checks
every value against the constraints declared next to its default, and raises a single
:class:`ConfigError` listing every problem, each naming the key, what is allowed and
what was received.

>>> cfg = load_config(overrides={"fusion.method": "mean", "num-server-rounds": 3})
>>> (cfg.fusion.method, cfg.num_server_rounds)
('mean', 3)
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """Invalid configuration; ``problems`` holds one line per bad key."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n  " + "\n  ".join(problems))


def option(
    default: Any,
    *,
    help: str,
    choices: tuple[str, ...] | Callable[[], list[str]] | None = None,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    check: Callable[[Any], str | None] | None = None,
) -> Any:
    """Declare a config field: its default, its meaning and what values are allowed."""
    return field(
        default=default,
        metadata={
            "help": help,
            "choices": choices,
            "low": low,
            "high": high,
            "low_open": low_open,
            "check": check,
        },
    )


def _model_names() -> list[str]:
    from fedkd.models import MODELS

    return MODELS.names()


def _fusion_names() -> list[str]:
    from fedkd.fusion import FUSION_METHODS

    return FUSION_METHODS.names()


def _scorer_names() -> list[str]:
    from fedkd.shielding import SENSITIVITY_SCORERS

    return SENSITIVITY_SCORERS.names()


def _plugin_problem(names: list[str], kind: str) -> str | None:
    """The first plugin among ``names`` that cannot be imported, as one line (None if all can)."""
    from fedkd.plugins import PluginError, is_plugin_path, load_plugin

    for name in names:
        if is_plugin_path(name):
            try:
                load_plugin(name, kind=kind)
            except PluginError as err:
                return str(err)
    return None


def _check_architectures(value: str) -> str | None:
    from fedkd.models import MODELS, is_model_name

    names = [n.strip() for n in value.split(",")]
    unknown = [n for n in names if not is_model_name(n)]
    if not value.strip() or unknown:
        return (
            "must be a comma-separated list of model names from "
            f"{', '.join(_model_names())} (or hf:/path/to/a/local/model, or an import path "
            f"package.module:Model); got '{value}'"
        )
    return _plugin_problem([n for n in names if n not in MODELS], "model")


def _check_model(value: Any) -> str | None:
    from fedkd.models import MODELS

    if not isinstance(value, str) or value.strip() not in MODELS and not _is_plugin(value):
        return f"must be one of {', '.join(_model_names())} or an import path package.module:Model; got {value!r}"
    return _plugin_problem([value.strip()] if value.strip() not in MODELS else [], "model")


def _check_fusion_method(value: Any) -> str | None:
    from fedkd.fusion import FUSION_METHODS

    if isinstance(value, str) and value in FUSION_METHODS:
        return None
    if not isinstance(value, str) or not _is_plugin(value):
        return (f"must be one of {', '.join(_fusion_names())} or an import path package.module:rule; "
                f"got {value!r}")
    return _plugin_problem([value.strip()], "fusion")


def _check_dataset(value: Any) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return f"must be a dataset name or an import path package.module:load; got {value!r}"
    return _plugin_problem([value.strip()], "dataset") if _is_plugin(value) else None


def _is_plugin(value: str) -> bool:
    from fedkd.plugins import is_plugin_path

    return is_plugin_path(value)


def _parse_teachers(value: str) -> dict[int, str]:
    """``"0:minilm, 3:hf:/models/x"`` -> ``{0: "minilm", 3: "hf:/models/x"}``."""
    teachers: dict[int, str] = {}
    for entry in value.split(","):
        if entry.strip():
            site, sep, name = entry.partition(":")
            if not sep or int(site) < 0 or int(site) in teachers:
                raise ValueError(entry)
            teachers[int(site)] = name.strip()
    return teachers


def _check_teachers(value: Any) -> str | None:
    from fedkd.models import is_model_name

    problem = (
        "must be a comma-separated list of site:model entries, each site once, such as "
        f"'0:minilm,3:minilm' (models: {', '.join(_model_names())}, or hf:/path); got {value!r}"
    )
    if not isinstance(value, str):
        return problem
    try:
        names = _parse_teachers(value).values()
    except ValueError:
        return problem
    return problem if not all(is_model_name(n) for n in names) else None


def _check_blend_candidates(value: Any) -> str | None:
    from fedkd.targets import parse_candidates

    try:
        parse_candidates(value)
    except (TypeError, ValueError):
        return f"must be distinct numbers in [0, 1], comma-separated (e.g. '0,0.5,1'); got {value!r}"
    return None


def _check_threshold(value: Any) -> str | None:
    if value == "median":
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0:
        return None
    return f"must be 'median' or a finite number >= 0; got {value!r}"


@dataclass(frozen=True)
class DataConfig:
    dataset: str = option(
        "digits",
        help="'digits' (embedded, offline), 'synthetic' (generated, offline, any size: "
        "data.synthetic-*; the dataset for large federations), 'topics' (embedded text corpus, offline) or a Hugging "
        "Face dataset name such as 'mnist', 'cifar10', 'ag_news' or 'text:<hub id>' (text); "
        "'file' (your own data at data.path); or a loader's import path package.module:load",
        check=_check_dataset,
    )
    path: str = option(
        "", help="your own data: a .csv file (one row an example), an .npz file with x and y, or a "
        "datasets.save_to_disk folder (a named dataset's local copy, or your own)",
    )
    label_column: str = option(
        "", help="CSV / save_to_disk: the label column ('' = 'label', 'target', 'class' or 'y', "
        "else the last column)",
    )
    feature_columns: str = option(
        "", help="CSV / save_to_disk: comma-separated feature columns ('' = an image column "
        "('image', 'img', 'pixel_values') if any, else every other numeric column)",
    )
    standardize: str = option(
        "none", choices=("none", "public", "private"),
        help="tabular features: subtract the mean and divide by the std per feature, fitted on "
        "the public set ('public') or on the sites' private training data ('private'), never on "
        "test data, then applied to every part",
    )
    num_clients: int = option(10, low=1, help="number of sites (clients)")
    partitioner: str = option(
        "dirichlet", choices=("dirichlet", "pathological", "iid"), help="how private data is split"
    )
    alpha: float = option(0.1, low=0, low_open=True, help="Dirichlet concentration (label skew)")
    classes_per_client: int = option(2, low=1, help="classes per client (pathological)")
    min_partition_size: int = option(20, low=1, help="smallest client share (Dirichlet)")
    public_fraction: float = option(
        0.3, low=0, high=0.9, low_open=True, help="share of all data used as public transfer set"
    )
    test_fraction: float = option(
        0.15, low=0, high=0.5, low_open=True, help="share of all data held out as global test set"
    )
    public_copies: int = option(
        0, low=0, high=100,
        help="jittered copies of each public example added to the transfer set (fedkd/data/splits.py "
        "augment_public): more points for knowledge to travel on, no privacy cost; knowledge, "
        "distillation and wire bytes grow by the same factor (float features only)",
    )
    public_jitter: float = option(
        0.5, low=0, help="std of the copies' Gaussian jitter, in each feature's std over the public set",
    )
    public_redact: str = option(
        "none", choices=("none", "pii"),
        help="text: 'pii' replaces every PII-like span of the public texts (numbers, digit runs, e-mail, "
        "phone, names after 'this is', titles) by the word 'redacted' before any site predicts or "
        "distils on them, so no release depends on what such a span says (docs/privacy.md)",
    )
    val_fraction: float = option(0.1, low=0, high=0.5, help="share of a client's data for validation")
    local_test_fraction: float = option(
        0.2, low=0, high=0.5, low_open=True, help="share of a client's data for its local test"
    )
    max_length: int = option(32, low=4, high=512, help="text: tokens per example (truncated, padded)")
    tokenizer: str = option(
        "", help="text: local tokenizer folder shared by every site ('' = the packaged MiniLM's)"
    )
    text_examples: int = option(
        3000, low=6, help="text: corpus size ('topics'), or most examples drawn from a named text dataset"
    )
    synthetic_examples: int = option(
        6000, low=6, help="synthetic: examples generated (all parts: public, test, the sites' shares); "
        "for N sites with m private examples each about N * m / (1 - public-fraction - test-fraction)",
    )
    synthetic_classes: int = option(10, low=2, help="synthetic: classes (equal sizes)")
    synthetic_features: int = option(
        64, low=1, help="synthetic: features per example (64 = 8 x 8, so cnn-small reads them too)"
    )
    synthetic_informative: int = option(
        16, low=1, help="synthetic: features that carry the class (<= synthetic-features; the rest are noise)"
    )
    synthetic_separation: float = option(
        2.0, low=0, low_open=True, help="synthetic: distance between class clusters (scikit-learn's "
        "class_sep; larger is easier)",
    )
    synthetic_shape: str = option(
        "", help="synthetic: per-example shape such as '8x8' or '1x8x8' (its product = "
        "synthetic-features), '' = flat vectors",
    )
    synthetic_seed: int = option(
        0, low=0, high=2**32 - 1, help="synthetic: seed of the generated data (the run's seed splits "
        "it and initialises the models; this one fixes the data itself)",
    )


@dataclass(frozen=True)
class ModelConfig:
    architectures: str = option(
        "mlp-small,mlp-large,cnn-small",
        check=_check_architectures,
        help="models given to clients in turn: client i gets entry i mod len",
    )


@dataclass(frozen=True)
class TeacherConfig:
    sites: str = option(
        "",
        check=_check_teachers,
        help="sites that also run a (large, pretrained) teacher, as site:model, e.g. '0:minilm'; "
        "the teacher alone trains on the site's private data and distils into the site's model",
    )
    release: str = option(
        "student",
        choices=("student", "teacher"),
        help="on a teacher site, the model that takes the fused knowledge, releases knowledge "
        "and is evaluated (ALMA)",
    )
    epochs: int = option(
        1, low=0, help="teacher epochs per round over private data (and over the public set "
        "when the teacher is released)"
    )
    lr: float = option(1e-4, low=0, low_open=True, help="teacher Adam learning rate (fine-tuning)")
    weight: float = option(
        0.5, low=0, high=1,
        help="student KD target on a teacher site: weight * teacher + (1 - weight) * fused knowledge",
    )


@dataclass(frozen=True)
class TrainConfig:
    mode: str = option(
        "sequential",
        choices=("sequential", "joint"),
        help="'sequential': distil then train; 'joint': CE + kd-weight * KD in one objective",
    )
    local_epochs: int = option(5, low=0, help="epochs over private data per round (privacy.local-epochs under DP)")
    distill_epochs: int = option(5, low=0, help="epochs over the public set per round")
    batch_size: int = option(32, low=1, help="batch size")
    lr: float = option(3e-3, low=0, low_open=True, help="Adam learning rate (privacy.lr for the DP-SGD step)")
    kd_temperature: float = option(2.0, low=0, low_open=True, help="KD temperature (student side)")
    kd_weight: float = option(1.0, low=0, help="weight of the KD term in 'joint' mode")
    target_choice: str = option(
        "auto", choices=("auto", "fused", "validated"),
        help="'fused': distil F_i; 'validated': try each of train.blend-candidates, keep the best by "
             "pooled validation NLL (fedkd/targets.py; not under DP or on teacher sites); "
             "'auto': validated for fusion method expert, fused for the baselines",
    )
    target_score: str = option(
        "nll", choices=("nll", "error"),
        help="what 'validated' compares, pooled over rounds: 'nll' (validation negative log-likelihood) or "
             "'error' (validation error rate, ties broken by the NLL)",
    )
    target_margin: float = option(
        0.0, low=0,
        help="'validated' with target-score 'nll': keep the federation's target (G, else F_i) unless another "
             "candidate's pooled validation NLL is lower by more than this many paired standard errors "
             "(fedkd/targets.py margin_choice; 0 = the lowest pooled NLL)",
    )
    blend_candidates: str = option(
        "0,1,consensus,consensus-local", check=_check_blend_candidates,
        help="what 'validated' tries: l = blend (1-l) K_i + l F_i (0 = no distillation, 1 = F_i), "
             "'consensus' = G, 'consensus-local' = G under the site's own label prior, 'mean' = the "
             "unsharpened consensus M (G = softmax(M / fusion.era-temperature), recovered on the site: no "
             "extra bytes), 'mean-local' = M under the site's prior",
    )


@dataclass(frozen=True)
class KnowledgeConfig:
    public_subset: int = option(0, low=0, help="public examples used per round (0 = all)")
    wire_format: str = option(
        "float16", choices=("float16", "uint8"),
        help="knowledge on the wire, both ways: 'float16' (2 bytes a probability) or 'uint8' "
             "(8-bit quantisation: rows of integers summing to 255, 1 byte a probability)",
    )


@dataclass(frozen=True)
class ShieldConfig:
    scorer: str = option("uniform", choices=_scorer_names, help="sensitivity scorer")
    temperature: float = option(1.0, low=0, low_open=True, help="base temperature T0")
    gamma: float = option(0.0, low=0, help="temperature gain: T = T0 * (1 + gamma * s)")
    noise_std: float = option(0.0, low=0, help="std of Gaussian noise added to logits")
    top_k: int = option(0, low=0, help="release only the k largest probabilities (0 = all)")
    release: str = option(
        "none", choices=("none", "label-rr", "withhold"),
        help="release mechanism with a guarantee: 'label-rr' releases a one-hot of k-ary randomized "
        "response on each row's top-1 label (pure eps-DP per public example and round on the "
        "site's prediction, charged to its ledger); 'withhold' releases nothing (eps 0) on the rows "
        "shield.release-rows chooses, and no site distils on them; 'none' releases the shielded probabilities",
    )
    release_epsilon: float = option(
        2.0, low=0, low_open=True,
        help="label-rr: epsilon per released label and round (keep probability e^eps/(e^eps+K-1))",
    )
    release_smoothing: float = option(
        0.0, low=0, high=0.99,
        help="label-rr: released row = (1 - s) one-hot + s/K (post-processing, free)",
    )
    release_rows: str = option(
        "all", choices=("all", "pii"),
        help="the rows the release mechanism acts on: 'all', or 'pii' (text data: only rows whose public "
        "input has a PII-like match, e.g. numbers, names; the others are released as shielded "
        "probabilities with no guarantee)",
    )


@dataclass(frozen=True)
class FusionConfig:
    method: str = option(
        "expert", check=_check_fusion_method,
        help="fusion method (see `fedkd options`), or a fusion rule's import path package.module:rule",
    )
    measure: str = option(
        "agreement", choices=("epd", "agreement"), help="effectiveness measure for knfu"
    )
    divergence: str = option(
        "hellinger", choices=("hellinger", "js", "kl"),
        help="divergence D of both measures (squared Hellinger; JS: KnFu's, O(N^2) logs with agreement)",
    )
    beta: float = option(10.0, low=0, help="weight sharpness: w ~ exp(-beta * d)")
    threshold: Any = option(
        "median", check=_check_threshold, help="neighbour threshold tau ('median' of each row)"
    )
    max_neighbours: int = option(10, low=1, help="neighbour-set size cap k, self included")
    confident_fraction: float = option(
        0.5, low=0, high=1, low_open=True, help="share of P where a client is most confident"
    )
    uniform_entropy: float = option(
        0.95, low=0, high=1, low_open=True, help="drop rows with entropy above this * log C"
    )
    sharpen_temperature: float = option(0.0, low=0, help="softmax(F / T) after fusion (0 = off)")
    era_temperature: float = option(0.1, low=0, low_open=True, help="DS-FL ERA temperature")
    prior_weight: float = option(
        1.0, low=0, help="expert: gamma, weight of the receiver's own label prior log pi_i(c)"
    )
    prior_floor: float = option(
        1e-3, low=0, high=1, low_open=True, help="expert: floor of each sender's label prior pi_j(c)"
    )
    consensus: str = option(
        "auto", choices=("auto", "on", "off"),
        help="also send each site the consensus G (era's sharpened mean of all knowledge) beside F_i, "
             "for train.blend-candidates' 'consensus' ('auto': on for method expert)",
    )

    @property
    def sends_consensus(self) -> bool:
        return self.consensus == "on" or (self.consensus == "auto" and self.method == "expert")
    neighbours: str = option(
        "effective", choices=("all", "effective"),
        help="expert: senders per receiver (every site, or its effective neighbours as knfu)",
    )
    trust: str = option(
        "off", choices=("verified", "claimed", "off"),
        help="expert: 'claimed' checks each sender on the classes it claims (its label prior) by the receiver "
             "and the senders it has already verified (EigenTrust-like, 3 steps seeded by the receiver), so an "
             "honest holder of classes the receiver lacks can pass; 'verified' scales each class holder by the receiver's check of it on the examples "
             "the receiver confidently calls that class, and sends each site its own consensus G_i over the "
             "senders it trusts (use it with neighbours='all' when some sites may send junk: adversaries then get "
             "1-3% of F_i instead of 19-55%, at -2.2 points of clean ALMA at alpha 0.1); 'off' (default): label "
             "priors alone and G over every sender",
    )
    trust_beta: float = option(10.0, low=0, help="expert, verified/claimed trust: sharpness, v = exp(-beta (1 - recall))")
    trust_confidence: float = option(
        0.5, low=0, high=1, low_open=True,
        help="expert, verified/claimed trust: a site calls x a c when its top class is c at this probability or more",
    )
    trust_null: float = option(
        1.0, low=0,
        help="expert, verified/claimed trust: null expert kappa = this * exp(-trust-beta / 2) / C (0 = none)",
    )
    dp_knowledge: str = option(
        "auto", choices=("auto", "evidence", "votes", "soft"),
        help="under DP (fedkd/dp_knowledge.py): 'evidence' abstains (uniform row) wherever the senders' "
             "evidence alone, F_i without the receiver's prior, is near-uniform; 'votes' fuses each site's "
             "top-1 label as a smoothed one-hot, the consensus is the unsharpened vote mean and rows below "
             "vote-threshold abstain; 'soft': the released rows as without DP; 'auto': evidence for method "
             "expert, soft for the others",
    )
    evidence_entropy: float = option(
        0.25, low=0, high=1, low_open=True,
        help="dp-knowledge evidence: abstain where the evidence-only row's entropy is above this * log C "
             "(0.25: measured at epsilon 4, docs/privacy.md; looser values let in rows that cost accuracy)",
    )
    vote_smoothing: float = option(
        0.1, low=0, high=0.99, help="dp-knowledge votes: a vote is (1 - s) one-hot + s / C",
    )
    vote_threshold: float = option(
        0.5, low=0, high=1, help="dp-knowledge votes: abstain (uniform row) where the fused top probability is below this",
    )
    release_debias: str = option(
        "off", choices=("off", "senders", "rounds"),
        help="with shield.release = 'label-rr' (fedkd/privacy/debias.py): 'senders' replaces fusion by the "
             "unbiased estimate (onehot - q) / (p - q) of each sender's top-1 one-hot, averaged over the round's "
             "senders and projected onto the simplex; 'rounds' also pools it over every round the public "
             "example was released (post-processing: the releases, and their epsilon, are unchanged); 'off': "
             "fuse the released one-hots as they are",
    )


@dataclass(frozen=True)
class GlobalStudentConfig:
    enabled: bool = option(True, help="distil fused knowledge into a server-side student")
    model: str = option("mlp-large", check=_check_model, help="global student architecture")
    epochs: int = option(10, low=1, help="distillation epochs per round")


@dataclass(frozen=True)
class PrivacyConfig:
    enabled: bool = option(False, help="DP-SGD (Opacus) on every site's private training")
    target_epsilon: float = option(
        4.0, low=0, low_open=True, help="each site's epsilon for the whole run (not per round)"
    )
    delta: float = option(
        0.0, low=0, high=1,
        help="delta; 0 = min(1e-5, 1/(100 n_i)) for a site with n_i examples (delta * n_i <= 0.01)",
    )
    max_grad_norm: float = option(1.0, low=0, low_open=True, help="per-example clipping norm C")
    accountant: str = option(
        "prv", choices=("rdp", "prv", "gdp"),
        help="Opacus accountant that calibrates sigma and reports epsilon: 'prv' (tightest sound: "
        "min of PRV and RDP, RDP where PRV is out of range), 'rdp', 'gdp' (approximate, can under-estimate)",
    )
    local_epochs: int = option(
        1, low=1,
        help="epochs over private data per round under DP (instead of train.local-epochs): "
        "fewer, less noisy steps; the noise multiplier is calibrated for these",
    )
    lr: float = option(
        0.03, low=0, low_open=True,
        help="Adam learning rate of the DP-SGD step (instead of train.lr)",
    )
    distill_epochs: int = option(
        5, low=0,
        help="epochs over the public set per round under DP (instead of train.distill-epochs); "
        "public data only, no privacy cost",
    )
    distill_target: str = option(
        "fused", choices=("fused", "consensus"),
        help="under DP: what the site distils, its F_i ('fused') or the federation's consensus G "
        "('consensus', sent when fusion.consensus is on; F_i where none was sent)",
    )
    selection: str = option(
        "off", choices=("off", "noisy-max"),
        help="under DP: 'noisy-max' lets a site keep, after its private step, the best of its private model and "
        "that model distilled on F_i or on G, chosen by report-noisy-max on its private validation split "
        "(fedkd/privacy/selection.py; distillation then comes after the private step), charged to its ledger",
    )
    selection_epsilon: float = option(
        0.4, low=0, low_open=True,
        help="selection: epsilon of all the run's choices together (DP-SGD is calibrated for "
        "target-epsilon minus this, so that the two compose to the target)",
    )
    selection_rounds: int = option(
        3, low=1, help="selection: number of choices, spread evenly over rounds 2..num-server-rounds",
    )
    student: str = option(
        "auto", choices=("auto", "consensus", "off"),
        help="under DP: 'consensus' keeps each site's DP model for private training and release only (it never "
        "distils, so the sites' releases stay independent) and reports a student distilled on the public set "
        "from softmax(log K_i + log M / privacy.student-temperature), K_i its DP model's prediction, M the "
        "federation's mean (fedkd/dp_knowledge.py student_target); 'auto' = consensus for fusion.method expert "
        "without privacy.selection",
    )
    student_temperature: float = option(
        0.25, low=0, low_open=True,
        help="student: tau in softmax(log K_i + log M / tau); smaller trusts the federation's mean more",
    )
    student_epochs: int = option(
        20, low=1, help="student: distillation epochs each round, from the student's initial weights",
    )
    student_correction: str = option(
        "prior", choices=("off", "prior"),
        help="student: 'prior' divides M by its class marginal over the public rows before the product "
        "(log M - log mean_x M), so that classes few sites hold are not out-voted",
    )
    ema_decay: float = option(
        0.7, low=0, high=0.99,
        help="student: the DP model's knowledge (what the site releases and its own K_i in the student's target) "
        "comes from an exponential moving average of its weights over rounds, d * previous + (1 - d) * this "
        "round's (fedkd/privacy/dpsgd.py iterate_average; post-processing, no privacy cost); 0 = the last iterate "
        "(the default until 2026-12-07; docs/privacy.md 'Averaging the DP iterates')",
    )
    distill_order: str = option(
        "before", choices=("before", "after"),
        help="under DP: distil the fused knowledge 'before' the private step (as without DP) or 'after' it "
        "(the released and evaluated model is then the distilled one)",
    )
    grad_sample_mode: str = option(
        "auto",
        choices=("auto", "hooks", "functorch", "ew", "ghost", "direct"),
        help="per-example gradients: Opacus's 'hooks' (materialised), 'functorch' (vmap), 'ew' "
        "(expanded weights), 'ghost' (ghost clipping: norms only, far less memory), or fedkd's "
        "'direct' (one backward pass, Linear/Conv2d/GroupNorm models only); 'auto' = the fastest "
        "measured (docs/benchmarks.md): direct for the registry's vector models, ghost for text "
        "models, hooks otherwise",
    )
    freeze_embeddings: bool = option(
        True,
        help="text models: embedding tables skip DP-SGD steps (smaller noise dimension and "
        "memory); they still train in the public distillation steps",
    )
    noise_seed: str = option(
        "auto",
        choices=("auto", "run-seed", "site-secret", "secure-rng"),
        help="where DP sampling/noise and shielding noise come from: 'run-seed' (reproducible "
        "from the run config, by the server too), 'site-secret' (a secret each site keeps), "
        "'secure-rng' (Opacus secure_mode, needs torchcsprng); 'auto' = site-secret in "
        "deployment, run-seed in simulation; in deployment a site's node config decides and "
        "the run config cannot lower it to run-seed",
    )


ADVERSARY_KINDS = ("random", "flip", "nan", "negative", "wrong-shape", "extra-key", "int-dtype")


def _parse_adversaries(value: str, default_kind: str) -> dict[int, str]:
    adversaries = {}
    for entry in value.split(","):
        if entry.strip():
            client, _, kind = entry.partition(":")
            adversaries[int(client)] = kind.strip() or default_kind
    return adversaries


def _check_client_list(value: Any) -> str | None:
    problem = (
        "must be a comma-separated list of client ids, each optionally with ':kind' "
        f"({', '.join(ADVERSARY_KINDS)}), such as '0,3:flip'; got {value!r}"
    )
    if not isinstance(value, str):
        return problem
    try:
        kinds = _parse_adversaries(value, "random").values()
    except ValueError:
        return problem
    return problem if any(k not in ADVERSARY_KINDS for k in kinds) else None


@dataclass(frozen=True)
class AdversaryConfig:
    clients: str = option(
        "", check=_check_client_list,
        help="simulated misbehaving sites, e.g. '0,3:flip' (robustness studies and tests)",
    )
    kind: str = option(
        "random",
        choices=ADVERSARY_KINDS,
        help="what listed sites without ':kind' send instead of honest knowledge (fedkd.adversary)",
    )


@dataclass(frozen=True)
class CheckpointConfig:
    resume: bool = option(
        False,
        help="continue the run in output-dir/run-name from its last checkpoint "
        "(same settings and seeds; num-server-rounds may grow)",
    )
    site_state_dir: str = option(
        "",
        help="where sites without a node-config 'state-dir' keep their state after each "
        "round ('' = in memory only; fedkd simulate uses <run dir>/site-state)",
    )


@dataclass(frozen=True)
class IdentityConfig:
    site_keys: str = option(
        "",
        help="the server operator's plan binding each partition id to its site's public key: "
        "a TOML plan (fedkd deploy keys writes <keys>/sites.toml) or a folder of site-<i>.pub "
        "files, read on the server host; every reply must then be signed with its partition's "
        "key ('' = off: partition ids are taken as claimed, as in a simulation; docs/deployment.md)",
    )


def _check_secret_format(value: Any) -> str | None:
    problem = (
        "must be a sentence with 1 to 8 digit slots '{}' and no other braces, such as "
        f"'my pin is {{}} {{}} {{}} {{}}'; got {value!r}"
    )
    if not isinstance(value, str):
        return problem
    slots = value.count("{}")
    rest = value.replace("{}", "")
    return problem if not 1 <= slots <= 8 or "{" in rest or "}" in rest else None


@dataclass(frozen=True)
class AuditConfig:
    enabled: bool = option(
        False,
        help="record what a privacy audit needs (fedkd audit RUN_DIR): the target site's "
        "candidate examples and which were members, its released knowledge per round; "
        "changes the target site's private data (docs/audit.md)",
    )
    site: int = option(0, low=0, help="the audited site (its private training examples are the targets)")
    canaries: int = option(
        0, low=0,
        help="candidate examples drawn from the site's train split, each trained on with "
        "probability 1/2 (0 = all of them)",
    )
    canary_labels: str = option(
        "natural", choices=("natural", "mislabeled"),
        help="candidates keep their label ('natural') or get a random wrong one ('mislabeled', "
        "crafted canaries: the strongest test of DP)",
    )
    secret_format: str = option(
        "my pin is {} {} {} {}", check=_check_secret_format,
        help="text: Secret Sharer canary format, each {} a random digit",
    )
    secret_repeats: int = option(
        0, low=0, help="text: times the secret is inserted into the site's private text (0 = none)"
    )
    secret_label: int = option(0, low=0, help="text: class label the secret sentence carries")
    secret_decoys: int = option(
        100, low=0,
        help="text: other fillings of the format inserted once each with another label, so "
        "that the format alone does not give the secret's label (the digits must be learnt)",
    )
    reference_models: int = option(
        4, low=0, help="reference models of LiRA and RMIA, each trained on a random half of the "
        "candidates (0 = LOSS and the trained attacks only)"
    )
    reference_epochs: int = option(
        0, low=0, help="epochs of each reference model (0 = num-server-rounds * train.local-epochs)"
    )
    exposure_candidates: int = option(
        10000, low=10, help="text: random secret fillings the secret is ranked against"
    )
    release_draws: int = option(
        100, low=1, help="text: independent draws of a random release (logit noise, label-rr) "
        "over which the exposure through it is averaged (one draw is a random variable)"
    )
    bootstrap: int = option(
        10000, low=0, help="bootstrap replicates of the metric intervals (10,000 keep their ends "
        "within 0.01 between seeds at ~100 members / 100 non-members)"
    )
    attack_folds: int = option(
        2, low=2, help="cross-fitting folds of the trained attacks (the attacker knows the "
        "membership of the other folds' candidates; 2 = half)"
    )
    rmia_offline_a: float = option(
        0.3, low=0.0, high=1.0,
        help="offline RMIA's a in p(x) = ((1 + a) p_OUT(x) + 1 - a) / 2 (Zarifzadeh et al. 2024)"
    )
    confidence: float = option(
        0.95, low=0.5, high=0.999, help="confidence of intervals and of the epsilon lower bound"
    )


@dataclass(frozen=True)
class Config:
    num_server_rounds: int = option(20, low=1, help="federated rounds")
    eval_every: int = option(1, low=1, help="evaluate clients every N rounds (and the last)")
    min_clients: int = option(2, low=1, help="valid replies a round needs")
    fraction_train: float = option(
        1.0, low=0.0, low_open=True, high=1.0,
        help="share of the sites sampled to train each round (at least min-clients; 1 = every site)"
    )
    round_retries: int = option(1, low=0, help="retries of a round with too few replies")
    round_timeout: float = option(600.0, low=0, low_open=True, help="seconds to wait for replies")
    seed: int = option(0, low=0, high=2**32 - 1, help="seed for data split, models and noise")
    output_dir: str = option("runs", help="parent folder of run directories")
    run_name: str = option("", help="run directory name (default: method and a timestamp)")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    knowledge: KnowledgeConfig = field(default_factory=KnowledgeConfig)
    shield: ShieldConfig = field(default_factory=ShieldConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    global_student: GlobalStudentConfig = field(default_factory=GlobalStudentConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    adversary: AdversaryConfig = field(default_factory=AdversaryConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    identity: IdentityConfig = field(default_factory=IdentityConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)

    def to_flat(self) -> dict[str, Any]:
        """Flat ``{"fusion.method": "knfu", ...}`` mapping, as Flower's run config."""
        return dict(_flatten(self))

    def to_nested(self) -> dict[str, Any]:
        """Nested tables with kebab-case keys, ready for a TOML file."""
        nested: dict[str, Any] = {}
        for key, value in self.to_flat().items():
            *sections, leaf = key.split(".")
            table = nested
            for section in sections:
                table = table.setdefault(section, {})
            table[leaf] = value
        return nested

    def digest(self) -> str:
        """sha256 of the canonical flat config: server and sites check they run the same one."""
        import hashlib
        import json

        return hashlib.sha256(json.dumps(self.to_flat(), sort_keys=True).encode()).hexdigest()

    def to_toml(self) -> str:
        """The resolved configuration as TOML (``fedkd simulate --config`` reads it back)."""
        import tomli_w

        return tomli_w.dumps(self.to_nested())

    @property
    def adversaries(self) -> dict[int, str]:
        """Simulated misbehaving client ids and what each sends."""
        return _parse_adversaries(self.adversary.clients, self.adversary.kind)

    @property
    def validated_targets(self) -> bool:
        """Whether sites choose their distillation target on validation (``train.target-choice``)."""
        choice = self.train.target_choice
        return choice == "validated" or (choice == "auto" and self.fusion.method == "expert")

    @property
    def dp_student(self) -> bool:
        """Whether DP sites report a public-set student (``privacy.student`` resolved; False without DP)."""
        choice = self.privacy.student
        if not self.privacy.enabled or choice == "off":
            return False
        # auto: expert's sites, unless DP model selection was asked for (it chooses the one model's target)
        return choice == "consensus" or (self.fusion.method == "expert" and self.privacy.selection == "off")

    @property
    def dp_knowledge(self) -> str | None:
        """How the server fuses DP sites' knowledge (``fusion.dp-knowledge`` resolved: ``votes``,
        ``evidence`` or ``soft``; None without DP)."""
        if not self.privacy.enabled:
            return None
        choice = self.fusion.dp_knowledge
        if choice == "auto":
            return "evidence" if self.fusion.method == "expert" else "soft"
        return choice

    def architecture_for(self, client: int) -> str:
        """Model name of client ``client`` (architectures are assigned in turn)."""
        names = [n.strip() for n in self.model.architectures.split(",")]
        return names[client % len(names)]

    def teacher_for(self, client: int) -> str:
        """Teacher model name of site ``client`` ('' for a site without a teacher)."""
        return _parse_teachers(self.teacher.sites).get(client, "")


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _flatten(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    items = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = prefix + _kebab(f.name)
        if dataclasses.is_dataclass(value):
            items.extend(_flatten(value, key + "."))
        else:
            items.append((key, value))
    return items


def _leaf_fields(cls: type, prefix: str = "") -> dict[str, dataclasses.Field]:
    leaves: dict[str, dataclasses.Field] = {}
    for f in dataclasses.fields(cls):
        key = prefix + _kebab(f.name)
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            leaves.update(_leaf_fields(f.default_factory, key + "."))
        else:
            leaves[key] = f
    return leaves


CONFIG_FIELDS: dict[str, dataclasses.Field] = _leaf_fields(Config)
"""Every config key (dotted, kebab-case) and its declaration."""


def flatten_mapping(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested TOML tables to dotted keys; dotted keys pass through."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        full = prefix + key
        if isinstance(value, Mapping):
            flat.update(flatten_mapping(value, full + "."))
        else:
            flat[full] = value
    return flat


def parse_value(text: str) -> Any:
    """Parse a ``--set`` value as TOML (numbers, booleans, quoted strings), else a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _coerce(key: str, f: dataclasses.Field, value: Any) -> tuple[Any, str | None]:
    """Convert ``value`` to the field's type and check its constraints."""
    meta = f.metadata
    default = f.default
    if isinstance(default, bool):
        if isinstance(value, str) and value.lower() in ("true", "false"):
            value = value.lower() == "true"
        if not isinstance(value, bool):
            return value, f"{key}: must be true or false; got {value!r}"
    elif isinstance(default, int) and not isinstance(default, bool):
        if isinstance(value, float) and value.is_integer() and abs(value) <= 2**53:
            value = int(value)  # 3.0 means 3; 1e30 is no integer anyone meant
        if isinstance(value, bool) or not isinstance(value, int):
            return value, f"{key}: must be an integer; got {value!r}"
        if not -(2**63) <= value < 2**63:
            return value, f"{key}: must be a 64-bit integer; got {value!r}"
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return value, f"{key}: must be a number; got {value!r}"
        value = float(value)
        if not math.isfinite(value):
            return value, f"{key}: must be finite; got {value!r}"
    elif isinstance(default, str) and meta["check"] is None and not isinstance(value, str):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and meta["choices"] is None:
            value = str(value)  # `--set run-name=2024` parses as a number; a name was meant
        else:
            return value, f"{key}: must be a string; got {value!r}"

    if meta["check"] is not None:
        problem = meta["check"](value)
        if problem:
            return value, f"{key}: {problem}"
    choices = meta["choices"]
    if choices is not None:
        allowed = list(choices() if callable(choices) else choices)
        if value not in allowed:
            return value, f"{key}: must be one of {', '.join(allowed)}; got {value!r}"
    low, high = meta["low"], meta["high"]
    if low is not None and (value < low or (meta["low_open"] and value == low)):
        bound = f"> {low}" if meta["low_open"] else f">= {low}"
        return value, f"{key}: must be {bound}; got {value!r}"
    if high is not None and value > high:
        return value, f"{key}: must be <= {high}; got {value!r}"
    return value, None


def build_config(values: Mapping[str, Any]) -> Config:
    """Build a :class:`Config` from flat or nested values; unknown keys are errors.

    Keys missing from ``values`` take their defaults. Raises :class:`ConfigError`
    listing every problem at once.
    """
    flat = flatten_mapping(values)
    problems: list[str] = []
    accepted: dict[str, Any] = {}
    for key, value in flat.items():
        f = CONFIG_FIELDS.get(key)
        if f is None:
            close = difflib.get_close_matches(key, CONFIG_FIELDS, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            problems.append(f"{key}: unknown key{hint}")
            continue
        value, problem = _coerce(key, f, value)
        if problem:
            problems.append(problem)
        else:
            accepted[key] = value

    problems.extend(_cross_checks(accepted, rejected=set(flat) - set(accepted)))
    if problems:
        raise ConfigError(problems)

    sections: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for key, value in accepted.items():
        if "." in key:
            section, leaf = key.split(".", 1)
            sections.setdefault(section, {})[leaf.replace("-", "_")] = value
        else:
            top[key.replace("-", "_")] = value
    section_types = {_kebab(f.name): f.default_factory for f in dataclasses.fields(Config) if f.default_factory is not dataclasses.MISSING}
    for section, kwargs in sections.items():
        top[section.replace("-", "_")] = section_types[section](**kwargs)
    return Config(**top)


def _cross_checks(flat: Mapping[str, Any], rejected: set[str]) -> list[str]:
    """Checks across keys, each made only when all the keys it involves are valid."""
    defaults = Config().to_flat()
    get = lambda key: flat.get(key, defaults[key])  # noqa: E731
    valid = lambda *keys: not rejected.intersection(keys)  # noqa: E731
    problems = []
    if valid("min-clients", "data.num-clients") and get("min-clients") > get("data.num-clients"):
        problems.append(
            f"min-clients: must be <= data.num-clients ({get('data.num-clients')}); "
            f"got {get('min-clients')}"
        )
    if (valid("data.public-fraction", "data.test-fraction")
            and get("data.public-fraction") + get("data.test-fraction") >= 0.95):
        problems.append(
            "data.public-fraction + data.test-fraction: must leave at least 5% of the data "
            f"for clients; got {get('data.public-fraction') + get('data.test-fraction'):.2f}"
        )
    if (valid("data.val-fraction", "data.local-test-fraction")
            and get("data.val-fraction") + get("data.local-test-fraction") >= 0.8):
        problems.append(
            "data.val-fraction + data.local-test-fraction: must leave at least 20% of a "
            "client's data for training"
        )
    if valid("checkpoint.resume", "run-name") and get("checkpoint.resume") and not get("run-name"):
        problems.append(
            "checkpoint.resume: needs the run-name of the stopped run (its run directory "
            "under output-dir); got an empty run-name"
        )
    if valid("teacher.sites", "data.num-clients"):
        outside = [s for s in _parse_teachers(get("teacher.sites")) if s >= get("data.num-clients")]
        if outside:
            problems.append(
                f"teacher.sites: site ids must be < data.num-clients ({get('data.num-clients')}); "
                f"got {', '.join(map(str, outside))}"
            )
    if valid("fusion.release-debias", "shield.release") and get("fusion.release-debias") != "off" \
            and get("shield.release") != "label-rr":
        problems.append(
            f"fusion.release-debias: {get('fusion.release-debias')!r} debiases randomized-response labels and "
            f"needs shield.release = 'label-rr'; got shield.release = {get('shield.release')!r} "
            "(set fusion.release-debias = 'off' or turn the release on)"
        )
    if valid("shield.release-rows", "shield.release") and get("shield.release-rows") != "all" \
            and get("shield.release") == "none":
        problems.append(
            f"shield.release-rows: {get('shield.release-rows')!r} chooses the rows a release mechanism acts on and "
            f"needs shield.release = 'label-rr' or 'withhold'; got shield.release = 'none'")
    if valid("shield.release-rows", "shield.release") and get("shield.release") == "withhold" \
            and get("shield.release-rows") == "all":
        problems.append(
            "shield.release: 'withhold' on every row releases nothing; set shield.release-rows = 'pii' "
            "(withhold the rows whose public text looks like personal data) or use 'label-rr'")
    if valid("privacy.student", "fusion.consensus", "fusion.method") and get("privacy.student") == "consensus" \
            and not (get("fusion.consensus") == "on" or (get("fusion.consensus") == "auto" and get("fusion.method") == "expert")):
        problems.append(
            "privacy.student: 'consensus' distils the federation's consensus G and needs it sent "
            f"(fusion.consensus = 'on', or 'auto' with fusion.method = 'expert'); got fusion.consensus = "
            f"{get('fusion.consensus')!r} with fusion.method = {get('fusion.method')!r}"
        )
    if valid("train.target-margin", "train.target-score") and get("train.target-margin") > 0 \
            and get("train.target-score") != "nll":
        problems.append(
            "train.target-margin: compares per-example validation NLLs and needs train.target-score = 'nll'; "
            f"got train.target-score = {get('train.target-score')!r} (set train.target-margin = 0 or the score to 'nll')"
        )
    if valid("audit.enabled", "audit.site", "data.num-clients") and get("audit.enabled") \
            and get("audit.site") >= get("data.num-clients"):
        problems.append(
            f"audit.site: must be < data.num-clients ({get('data.num-clients')}); got {get('audit.site')}"
        )
    problems.extend(_data_checks(get, valid))
    problems.extend(_modality_checks(get, valid))
    if (valid("privacy.selection", "privacy.selection-epsilon", "privacy.target-epsilon")
            and get("privacy.selection") != "off"
            and get("privacy.selection-epsilon") >= get("privacy.target-epsilon")):
        problems.append(
            f"privacy.selection-epsilon: must be below privacy.target-epsilon ({get('privacy.target-epsilon'):g}) "
            f"when privacy.selection is on; got {get('privacy.selection-epsilon'):g}"
        )
    if (valid("privacy.enabled", "train.mode") and get("privacy.enabled")
            and get("train.mode") == "joint"):
        problems.append(
            "train.mode: must be 'sequential' when privacy.enabled is true (the public KD step "
            "stays outside the DP optimizer); got 'joint'"
        )
    return problems


EMBEDDED_DATASETS = ("digits", "synthetic", "topics")


def _data_checks(get: Callable[[str], Any], valid: Callable[..., bool]) -> list[str]:
    """data.path only where something reads it; standardisation only of float features."""
    if not valid("data.dataset", "data.path"):
        return []
    from fedkd.data.text import is_text_dataset

    dataset, path = get("data.dataset"), get("data.path")
    problems = []
    if dataset in EMBEDDED_DATASETS and path:
        problems.append(
            f"data.path: the embedded dataset '{dataset}' reads no file; to train on '{path}' set "
            "data.dataset = \"file\" (CSV, x/y .npz or a save_to_disk folder)")
    if dataset == "file" and not path:
        problems.append("data.path: data.dataset 'file' reads your own data from data.path; got an empty data.path")
    if valid("data.standardize") and get("data.standardize") != "none" and is_text_dataset(dataset):
        problems.append(
            f"data.standardize: text data (data.dataset '{dataset}') is token ids; must be 'none'; "
            f"got {get('data.standardize')!r}")
    if valid("shield.release-rows") and get("shield.release-rows") == "pii" and not is_text_dataset(dataset):
        problems.append(
            f"shield.release-rows: 'pii' reads the public inputs as text and needs a text dataset; "
            f"got data.dataset '{dataset}' (use 'all')")
    if valid("data.public-redact") and get("data.public-redact") != "none" and not is_text_dataset(dataset):
        problems.append(
            f"data.public-redact: {get('data.public-redact')!r} rewrites public texts and needs a text dataset; "
            f"got data.dataset '{dataset}' (use 'none')")
    if valid("data.public-copies") and get("data.public-copies") > 0 and is_text_dataset(dataset):
        problems.append(
            f"data.public-copies: text data (data.dataset '{dataset}') is token ids, which cannot be jittered; "
            f"must be 0; got {get('data.public-copies')}")
    if dataset == "synthetic":
        problems.extend(_synthetic_checks(get, valid))
    return problems


def _synthetic_checks(get: Callable[[str], Any], valid: Callable[..., bool]) -> list[str]:
    """What scikit-learn's make_classification would refuse, named by our keys, and a shape
    that does not hold the features."""
    from fedkd.data.sources import CLUSTERS_PER_CLASS, parse_shape

    problems = []
    features, informative = get("data.synthetic-features"), get("data.synthetic-informative")
    if valid("data.synthetic-features", "data.synthetic-informative") and informative > features:
        problems.append(f"data.synthetic-informative: must be <= data.synthetic-features ({features}); "
                        f"got {informative}")
    classes = get("data.synthetic-classes")
    if (valid("data.synthetic-classes", "data.synthetic-informative")
            and classes * CLUSTERS_PER_CLASS > 2 ** min(informative, 62)):
        need = math.ceil(math.log2(classes * CLUSTERS_PER_CLASS))
        problems.append(
            f"data.synthetic-informative: {classes} classes of {CLUSTERS_PER_CLASS} clusters each need "
            f"at least {need} informative features (2**informative hypercube vertices); got {informative}")
    if valid("data.synthetic-examples", "data.synthetic-classes") and get("data.synthetic-examples") < classes * CLUSTERS_PER_CLASS:
        problems.append(
            f"data.synthetic-examples: must be >= {classes * CLUSTERS_PER_CLASS} (every cluster of "
            f"every class needs an example); got {get('data.synthetic-examples')}")
    if valid("data.synthetic-shape", "data.synthetic-features"):
        text = get("data.synthetic-shape")
        try:
            shape = parse_shape(text)
        except ValueError:
            problems.append(
                "data.synthetic-shape: must be '' (flat) or 1 to 3 positive integers joined by 'x', "
                f"such as '8x8' or '1x8x8'; got {text!r}")
        else:
            if shape and math.prod(shape) != features:
                problems.append(
                    f"data.synthetic-shape: its product must equal data.synthetic-features ({features}); "
                    f"got {text!r} ({math.prod(shape)} values)")
    return problems


def _modality_checks(get: Callable[[str], Any], valid: Callable[..., bool]) -> list[str]:
    """Text data needs text models (token ids in), other data needs vector/image models."""
    if not valid("data.dataset"):
        return []
    from fedkd.models import model_modality
    from fedkd.data.text import is_text_dataset

    dataset = get("data.dataset")
    wanted = "text" if is_text_dataset(dataset) else "vector"
    problems = []
    if valid("shield.scorer") and get("shield.scorer") == "pii" and wanted != "text":
        problems.append(
            f"shield.scorer: 'pii' reads text inputs and data.dataset '{dataset}' is not text; "
            "use 'uniform', 'confidence' or 'divergence'"
        )
    uses = {}
    if valid("model.architectures"):
        uses["model.architectures"] = [n.strip() for n in get("model.architectures").split(",")]
    if valid("teacher.sites"):
        uses["teacher.sites"] = list(_parse_teachers(get("teacher.sites")).values())
    if valid("global-student.enabled", "global-student.model") and get("global-student.enabled"):
        uses["global-student.model"] = [get("global-student.model")]
    for key, names in uses.items():
        wrong = [n for n in names if model_modality(n) != wanted]
        if wrong:
            if wanted == "text":
                from fedkd.models import MODELS

                fit = [n for n in MODELS.names() if model_modality(n) == "text"] + ["hf:/path"]
                why = f"data.dataset '{dataset}' is text (token ids)"
            else:
                fit = [n for n in _model_names() if model_modality(n) == "vector"]
                why = f"data.dataset '{dataset}' is not text; these models read token ids"
            problems.append(
                f"{key}: {', '.join(repr(n) for n in wrong)} cannot read this data: {why}; "
                f"use {', '.join(fit)}"
            )
    return problems


def load_config(
    path: str | Path | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Defaults <- TOML file at ``path`` <- ``overrides`` (flat or nested)."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError([f"config file not found: {path}"])
        try:
            values.update(flatten_mapping(tomllib.loads(path.read_text())))
        except tomllib.TOMLDecodeError as err:
            raise ConfigError([f"{path}: not valid TOML ({err})"]) from None
    if overrides:
        values.update(flatten_mapping(overrides))
    return build_config(values)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Parse ``["fusion.method=mean", "seed=3"]`` into a flat mapping."""
    overrides: dict[str, Any] = {}
    problems = []
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            problems.append(f"--set {pair!r}: expected key=value")
            continue
        overrides[key.strip()] = parse_value(text.strip())
    if problems:
        raise ConfigError(problems)
    return overrides


_NAMED_VALUES: dict[str, Callable[[], list[str]]] = {
    "model.architectures": lambda: [*_model_names(), "hf:/path", "package.module:Model"],
    "global-student.model": lambda: [*_model_names(), "package.module:Model"],
    "fusion.method": lambda: [*_fusion_names(), "package.module:rule"],
    "data.dataset": lambda: ["digits", "synthetic", "topics", "file", "mnist", "cifar10", "ag_news", "text:<hub id>",
                             "<hub id>", "package.module:load"],
}
"""Keys checked by a function rather than a fixed list: the values ``fedkd options`` lists."""


def allowed_values(key: str) -> list[str] | None:
    """The values a choice key accepts (None for a free or numeric key)."""
    if key in _NAMED_VALUES:
        return _NAMED_VALUES[key]()
    choices = CONFIG_FIELDS[key].metadata["choices"]
    if choices is None:
        return None
    return list(choices() if callable(choices) else choices)


def describe_options() -> str:
    """One line per key: name, default and meaning, and for a choice key the values it
    accepts (``fedkd options``)."""
    lines = []
    for key, f in CONFIG_FIELDS.items():
        values = allowed_values(key)
        allowed = f"  [{' | '.join(values)}]" if values else ""
        lines.append(f"{key} = {f.default!r}  # {f.metadata['help']}{allowed}")
    return "\n".join(lines)
