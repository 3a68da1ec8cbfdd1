"""DP-SGD on a site's private data through Opacus, charged to the site's ledger.

:func:`train_private` runs one round of DP-SGD (Abadi et al. 2016, Alg. 1: Poisson sampling
with rate q, per-example clipping to C, Gaussian noise of std sigma * C on the clipped sum,
divided by the expected batch q n) and records its steps in the run's
:class:`~fedkd.privacy.accounting.PrivacyLedger`, refusing a round that would exceed the
target. :func:`train_private_site` applies a site's config (per-example gradient mode, frozen
text embeddings) around it. :func:`iterate_average` keeps an exponential moving average of a
DP model's weights over rounds (post-processing of the DP iterates). The accounting itself
lives in :mod:`fedkd.privacy.accounting`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedkd.data import ArrayDataset
from fedkd.distillation import as_input_tensor
from fedkd.privacy.accounting import PrivacyLedger, PrivacyPlan, _is_real, import_opacus, steps_for

if TYPE_CHECKING:
    from opacus.optimizers import DPOptimizer

    from fedkd.config import Config


def iterate_average(model: nn.Module, *, decay: float) -> torch.optim.swa_utils.AveragedModel:
    """An exponential moving average of ``model``'s weights (and buffers) over its DP-SGD
    iterates, updated by ``average.update_parameters(model)`` once a round:

        theta_bar_1 = theta_1,    theta_bar_r = d * theta_bar_{r-1} + (1 - d) * theta_r,   d = ``decay``.

    Privacy: DP-SGD's guarantee (Abadi et al. 2016) covers every iterate theta_r (the
    accountant composes all the steps, as if each were released), so any function of them is
    post-processing and costs nothing. Why: averaging iterates cancels part of the Gaussian
    noise each step adds (Polyak & Juditsky 1992); De et al. 2022 ("Unlocking High-Accuracy
    Differentially Private Image Classification through Scale") evaluate an EMA of the DP-SGD
    parameters for the same reason. torch's :class:`~torch.optim.swa_utils.AveragedModel` with
    :func:`~torch.optim.swa_utils.get_ema_multi_avg_fn` does the arithmetic (its first update
    copies the model)."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    if not 0.0 < decay < 1.0:
        raise ValueError(f"iterate average: decay must be in (0, 1); got {decay!r}")
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def PrivacyEngine(*args: Any, **kwargs: Any):  # noqa: ANN201, N802  (opacus.PrivacyEngine)
    """Opacus's engine, imported on first use (a site without DP does not pay its import)."""
    return import_opacus("opacus").PrivacyEngine(*args, **kwargs)


# --------------------------------------------------------------------------- training


@dataclass(frozen=True)
class PrivateTrainResult:
    """Outcome of one round of :func:`train_private`.

    ``loss``: mean cross-entropy over the round's non-empty batches (nan if none);
    ``steps``: DP-SGD steps taken this round; ``epsilon``: the run's spend after the round;
    ``stopped``: True when the round was refused (budget); ``reason`` says why ("" if not).
    """

    loss: float
    steps: int
    epsilon: float
    stopped: bool
    reason: str


GRAD_SAMPLE_MODES = ("hooks", "functorch", "ew", "ghost", "direct")
"""Per-example gradient modes: four of Opacus's and fedkd's own. ``hooks`` materialises
every example's gradient (``p.grad_sample``) from module hooks; ``functorch`` computes them
with ``torch.func.vmap(grad)`` per layer; ``ew`` with PyTorch's expanded weights;
``ghost`` (ghost clipping, Li et al. 2022 / Bu et al. 2023) computes only per-example
gradient *norms* in a first backward pass and then backpropagates the clipping-weighted
loss sum_i min(1, C / ||g_i||) l_i in a second one: the same clipped sum, without a
[B, *param] tensor per parameter. ``direct`` (:mod:`fedkd.privacy.direct`; Linear, Conv2d
and GroupNorm layers only, see :func:`~fedkd.privacy.direct.supports_direct`) gets the
norms and the clipped sum from each layer's inputs and output gradients in *one* backward
pass that never computes the unclipped weight gradients, with ghost mode's optimizer,
data loader and accountant hook. All five clip to the same sum (tests/test_privacy.py)."""

AUTO_MODES = {"direct": "direct", "text": "ghost", "other": "hooks"}
"""``privacy.grad-sample-mode = "auto"``: the fastest correct mode by model kind, from
``simulations/micro/dp_step_time.py`` (docs/benchmarks.md, "DP step cost"): ``direct`` for
every model :func:`~fedkd.privacy.direct.supports_direct` accepts (the registry's
``mlp-small``, ``mlp-large``, ``cnn-small``), ``ghost`` for text models (memory: no
[B, vocab, hidden] per-example embedding gradients), ``hooks`` for anything else (plugins)."""


def resolve_grad_sample_mode(mode: str, model: nn.Module) -> str:
    """The per-example gradient mode for ``model``: ``mode`` itself, or for ``"auto"`` the
    measured choice of :data:`AUTO_MODES`. An explicit ``"direct"`` on a model with other
    layers is refused naming them."""
    from fedkd.models.text import TextClassifier
    from fedkd.privacy.direct import supports_direct

    if mode == "auto":
        if isinstance(model, TextClassifier):
            return AUTO_MODES["text"]
        return AUTO_MODES["direct"] if supports_direct(model) else AUTO_MODES["other"]
    if mode == "direct" and not supports_direct(model):
        kinds = sorted({type(m).__name__ for m in model.modules()
                        if any(p.requires_grad for p in m.parameters(recurse=False))})
        raise ValueError(
            "privacy.grad-sample-mode 'direct' supports models whose trainable layers are Linear, "
            f"Conv2d and affine GroupNorm only; this model has {', '.join(kinds)}; use auto, hooks or ghost")
    return mode


class PrivateTraining(NamedTuple):
    """Objects of a DP-SGD session: the Opacus-wrapped module, the ``DPOptimizer``, the
    Poisson ``DPDataLoader`` and the loss to use: ``F.cross_entropy`` in ``hooks`` mode,
    Opacus's two-pass ``DPLossFastGradientClipping`` around cross-entropy in ``ghost`` mode."""

    module: nn.Module
    optimizer: DPOptimizer
    data_loader: DataLoader
    criterion: Any = F.cross_entropy


def _round_seeds(seed: int, steps_so_far: int) -> tuple[int, int]:
    """Sampler and noise seeds for a round, from the caller's seed *and* the ledger's step
    count: a caller that passes the same seed every round still gets fresh Poisson masks
    and fresh noise (re-used noise would cancel between two rounds' models, which the
    accountant's independence assumption does not allow)."""
    words = np.random.SeedSequence([int(seed), int(steps_so_far)]).generate_state(2, dtype=np.uint64)
    return int(words[0] >> np.uint64(1)), int(words[1] >> np.uint64(1))


def _check_matches(data: ArrayDataset, plan: PrivacyPlan, ledger: PrivacyLedger) -> None:
    if ledger.plan != plan:
        raise ValueError("ledger.plan differs from plan: pass the plan the ledger was made for")
    if len(data) != plan.num_examples:
        raise ValueError(
            f"plan was made for {plan.num_examples} private examples but data has {len(data)}: "
            "the sample rate, and so the guarantee, depend on n; make the plan from this data"
        )


@contextlib.contextmanager
def private_training(
    model: nn.Module,
    data: ArrayDataset,
    *,
    plan: PrivacyPlan,
    ledger: PrivacyLedger,
    lr: float,
    seed: int = 0,
    secure_mode: bool = False,
    grad_sample_mode: str = "hooks",
) -> Iterator[PrivateTraining]:
    """Opacus DP-SGD objects for ``model`` on ``data`` whose accounting goes to ``ledger``.

    Inside the block every ``optimizer.step()`` clips per-example gradients to
    ``plan.max_grad_norm``, adds N(0, (sigma C)^2) to their sum, divides by the expected
    batch size q n (``loss_reduction="mean"``: the loss must be a per-example mean), and
    Opacus's step hook appends (sigma, q, 1) to ``ledger.accountant``. On exit the hooks
    and Opacus's per-parameter attributes are removed and gradients cleared, so ``model``
    (whose parameters are the ones that were updated) is a plain module again.

    How the ledger is plugged in: ``PrivacyEngine.make_private`` attaches
    ``self.accountant.get_optimizer_hook_fn(sample_rate=1/len(data_loader))`` to the
    optimizer, so the engine's ``accountant`` attribute is set to the ledger's accountant
    before ``make_private``; the sample rate Opacus derives equals ``plan.sample_rate``
    (checked). Optimizer: Adam (see :func:`train_private`) over the parameters that
    require gradients (frozen ones, such as text embeddings under
    :func:`fedkd.models.text.frozen_embeddings`, are neither clipped nor noised). Integer inputs
    (token ids) stay int64. ``grad_sample_mode``: see :data:`GRAD_SAMPLE_MODES`; compute the
    loss with the session's ``criterion``. Does not check the budget; :func:`train_private` does.
    """
    _check_matches(data, plan, ledger)
    if grad_sample_mode == "direct":
        resolve_grad_sample_mode("direct", model)  # refuses a model direct cannot clip
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise ValueError(
            f"grad_sample_mode must be one of {', '.join(GRAD_SAMPLE_MODES)}; got {grad_sample_mode!r}"
        )
    if secure_mode:
        try:
            engine = PrivacyEngine(accountant=plan.accountant, secure_mode=True)
        except ImportError:
            raise RuntimeError(
                "privacy.noise-seed 'secure-rng' (Opacus secure_mode) needs the torchcsprng package, "
                "which is not installed on this site; install it or use noise-seed 'site-secret'"
            ) from None
        loader_gen = noise_gen = None  # Opacus draws both from its secure generator
    else:
        # seeded pseudo-random sampling and noise: reproducible, but not hardened against
        # floating-point attacks on the noise (Opacus warns once; secure_mode=True for that)
        engine = PrivacyEngine(accountant=plan.accountant)
        sampler_seed, noise_seed = _round_seeds(seed, ledger.steps)
        loader_gen = torch.Generator().manual_seed(sampler_seed)
        noise_gen = torch.Generator().manual_seed(noise_seed)
    engine.accountant = ledger.accountant  # the run's one accountant, not a per-round one

    x = as_input_tensor(data.x)
    y = torch.as_tensor(data.y, dtype=torch.long)
    loader = DataLoader(TensorDataset(x, y), batch_size=plan.batch_size, generator=loader_gen)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    private = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=plan.max_grad_norm,
        poisson_sampling=True,
        loss_reduction="mean",
        noise_generator=noise_gen,
        grad_sample_mode="ghost" if grad_sample_mode == "direct" else grad_sample_mode,
        criterion=nn.CrossEntropyLoss(reduction="mean"),
    )
    direct = None
    if grad_sample_mode == "ghost":
        module, dp_optimizer, criterion, dp_loader = private
    elif grad_sample_mode == "direct":  # ghost mode's optimizer, loader and accountant hook; our clipping
        from fedkd.privacy.direct import DirectClipping, without_gradient_copies

        module, dp_optimizer, _, dp_loader = private
        dp_optimizer = without_gradient_copies(dp_optimizer)
        module.remove_hooks()  # Opacus's norm hooks, gone (disabled ones still run their wrappers): direct computes the norms itself
        direct = DirectClipping(model, max_grad_norm=plan.max_grad_norm).attach()
        criterion = F.cross_entropy
    else:
        (module, dp_optimizer, dp_loader), criterion = private, F.cross_entropy
    try:
        if dp_loader.sample_rate != plan.sample_rate:  # defence: accounting must match the plan
            raise RuntimeError(
                f"Opacus samples at rate {dp_loader.sample_rate!r} but the plan assumes "
                f"{plan.sample_rate!r}"
            )
        yield PrivateTraining(module, dp_optimizer, dp_loader, criterion)
    finally:
        if direct is not None:
            direct.detach()
        module.to_standard_module()  # removes hooks and grad_sample attributes
        for p in model.parameters():
            if hasattr(p, "summed_grad"):  # set by DPOptimizer, not removed by Opacus
                del p.summed_grad
            p.grad = None


def train_private(
    model: nn.Module,
    data: ArrayDataset,
    *,
    plan: PrivacyPlan,
    ledger: PrivacyLedger,
    lr: float,
    epochs: float | None = None,
    seed: int = 0,
    secure_mode: bool = False,
    grad_sample_mode: str = "hooks",
) -> PrivateTrainResult:
    """One round of DP-SGD (cross-entropy, per-example mean) on the site's private ``data``.

    Steps this round S = ceil(epochs / q) (``epochs`` defaults to
    ``plan.epochs_per_round``, giving ``plan.steps_per_round``). If
    ``ledger.can_afford(S)`` is False nothing is trained and the result has
    ``stopped=True`` and a reason: a site never spends beyond its target, even when asked
    for more rounds than it planned; releasing knowledge from the current model stays free.

    Otherwise ``model`` is trained in place (its own parameters are updated; Opacus's
    wrapper and hooks are removed afterwards) with Adam on the privatised gradient. Adam
    rather than SGD: it is invariant to the gradient's scale, so the learning rate used for
    non-private training (``train.lr``) stays sensible after clipping shrinks the gradient
    to norm <= C; the guarantee is unaffected (the optimizer only post-processes the noisy
    gradient). Each round's sampler and noise seeds come from (``seed``, steps so far).
    ``grad_sample_mode`` picks Opacus's per-example gradients (:data:`GRAD_SAMPLE_MODES`);
    parameters with ``requires_grad=False`` are left out of the DP step.
    """
    _check_matches(data, plan, ledger)
    epochs = plan.epochs_per_round if epochs is None else epochs
    if not _is_real(epochs) or not (math.isfinite(epochs) and epochs >= 0):
        raise ValueError(f"epochs must be a finite number >= 0; got {epochs!r}")
    steps = steps_for(epochs=float(epochs), sample_rate=plan.sample_rate)
    if steps == 0:
        return PrivateTrainResult(float("nan"), 0, ledger.epsilon(), False, "")
    if not ledger.can_afford(steps):
        spent = ledger.epsilon()
        return PrivateTrainResult(
            float("nan"),
            0,
            spent,
            True,
            f"budget exhausted: epsilon {spent:.2f} of {plan.target_epsilon:g} spent; "
            f"another {steps} steps would reach {ledger.epsilon_after(steps):.2f}",
        )
    model.train()
    losses: list[float] = []
    taken = 0
    stand_in = (as_input_tensor(data.x[:1]), torch.as_tensor(data.y[:1], dtype=torch.long))
    session = private_training(
        model, data, plan=plan, ledger=ledger, lr=lr, seed=seed, secure_mode=secure_mode,
        grad_sample_mode=grad_sample_mode,
    )
    with session as dp:
        while taken < steps:
            for xb, yb in dp.data_loader:  # one pass = 1/q Poisson-sampled batches
                dp.optimizer.zero_grad()
                if len(yb):
                    loss = dp.criterion(dp.module(xb), yb)
                    losses.append(loss.item())
                else:
                    # empty Poisson batch: still a step (noise only), as the analysis assumes.
                    # Some models (transformers) cannot run on zero rows, so one stand-in row
                    # goes through with weight 0: its gradient, hence its clipped
                    # contribution, is exactly zero, as an empty batch's would be.
                    loss = dp.criterion(dp.module(stand_in[0]), stand_in[1]) * 0.0
                loss.backward()
                dp.optimizer.step()
                taken += 1
                if taken == steps:
                    break
    return PrivateTrainResult(
        float(np.mean(losses)) if losses else float("nan"), taken, ledger.epsilon(), False, ""
    )


def train_private_site(
    model: nn.Module, data: ArrayDataset, *, config: Config, ledger: PrivacyLedger, lr: float,
    seed: int, secure_mode: bool = False,
) -> PrivateTrainResult:
    """:func:`train_private` with a site's Opacus settings: per-example gradients by
    ``privacy.grad-sample-mode`` ('auto': :func:`resolve_grad_sample_mode`),
    text embeddings frozen in the DP step when ``privacy.freeze-embeddings``. ``seed`` is
    the round's private seed (:func:`fedkd.seeds.noise_rng_seed`); ``secure_mode``: Opacus's
    secure RNG instead (noise source ``secure-rng``)."""
    from fedkd.models.text import frozen_embeddings

    p = config.privacy
    mode = resolve_grad_sample_mode(p.grad_sample_mode, model)
    with frozen_embeddings(model, enabled=p.freeze_embeddings):
        return train_private(model, data, plan=ledger.plan, ledger=ledger, lr=lr, seed=seed,
                             secure_mode=secure_mode, grad_sample_mode=mode)
