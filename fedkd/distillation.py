"""Local training, knowledge distillation and evaluation: plain PyTorch, no Flower.

KD loss (Hinton et al. 2015), with target probabilities p(x) (fused knowledge, or a
teacher's softmax at temperature 1) and student logits z(x):

    L_KD = T^2 * (1/B) sum_x KL(p_T(x) || softmax(z(x) / T)),   p_T = softmax(log p / T)

Both sides are softened by the same T, as in Hinton et al. where teacher and student
logits are both divided by T: a teacher whose logits are log p releases p_T at T. The
minimiser is then softmax(z) = p, so a distribution that goes round the federation
(released, fused, distilled, released again) keeps its shape. Matching softmax(z / T) to
the unsoftened p instead would give softmax(z) proportional to p^T: every round would
sharpen the knowledge (squared at T = 2), and where local training is too weak to pull
back, as under strong DP, the federation collapses onto whichever class leads (measured:
ALMA 0.07 at epsilon 1 with ``mean``). Sharpening, when wanted, is explicit:
``fusion.sharpen-temperature``.

The T^2 factor keeps gradient magnitudes comparable across temperatures; the mean is
per example (``reduction="batchmean"``), which is also what DP-SGD needs.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedkd.data import ArrayDataset


def soften(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(log p / T): the distribution a teacher with logits log p releases at T
    (zeros stay zero)."""
    if temperature == 1.0:
        return probs
    return torch.softmax(torch.log(probs) / temperature, dim=-1)


def kd_loss(student_logits: torch.Tensor, target_probs: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T^2 * batch-mean KL(soften(p, T) || softmax(z / T)); see module doc."""
    log_student = F.log_softmax(student_logits / temperature, dim=-1)
    return F.kl_div(log_student, soften(target_probs, temperature), reduction="batchmean") * temperature**2


class Adam:
    """Adam (Kingma & Ba 2015) with torch.optim.Adam's defaults (betas 0.9, 0.999, eps 1e-8,
    no weight decay): m <- b1 m + (1 - b1) g, v <- b2 v + (1 - b2) g^2,
    theta <- theta - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps).

    The update is torch's own kernel (``torch.optim.adam.adam``, called with exactly the
    arguments ``torch.optim.Adam.step`` passes it), so parameters come out bit for bit as
    with ``torch.optim.Adam`` (tests/test_distillation.py). What it leaves out is the
    ``torch.optim.Optimizer`` base class, whose ``add_param_group``, ``zero_grad`` and
    ``step`` import ``torch._dynamo`` on first use: measured 2.4 s of every fresh process
    (each simulated site's actor, the in-process runner) that trains, and ~100 MiB, for a
    compiler a plain training step never calls. DP-SGD keeps ``torch.optim.Adam``: Opacus
    wraps a ``torch.optim.Optimizer``."""

    def __init__(self, params, *, lr: float) -> None:  # noqa: ANN001  an iterable of tensors
        self.params = list(params)
        self.lr = float(lr)
        self.state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        from torch.optim.adam import adam

        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in self.params:
            if p.grad is None:
                continue
            state = self.state.get(p)
            if state is None:  # as torch.optim.Adam's first step (not capturable, not fused)
                scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
                state = self.state[p] = {"step": torch.tensor(0.0, dtype=scalar, device="cpu"),
                                         "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                         "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        adam(params, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False,
             has_complex=any(torch.is_complex(p) for p in params), beta1=0.9, beta2=0.999, lr=self.lr,
             weight_decay=0, eps=1e-8, maximize=False, foreach=None, capturable=False, differentiable=False,
             fused=None, grad_scale=None, found_inf=None, decoupled_weight_decay=False)


def _loader(tensors: tuple[torch.Tensor, ...], batch_size: int, seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(*tensors), batch_size=batch_size, shuffle=True, generator=generator)


def as_input_tensor(x: np.ndarray) -> torch.Tensor:
    """Model inputs as a tensor: integer arrays (token ids) stay int64, others become float32."""
    x = np.asarray(x)
    return torch.as_tensor(x, dtype=torch.long if x.dtype.kind in "iu" else torch.float32)


def _as_tensors(data: ArrayDataset) -> tuple[torch.Tensor, torch.Tensor]:
    return as_input_tensor(data.x), torch.as_tensor(data.y, dtype=torch.long)


def train_supervised(
    model: nn.Module,
    data: ArrayDataset,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int = 0,
) -> float:
    """Cross-entropy training on ``data``; returns the mean loss of the last epoch."""
    if epochs == 0 or len(data) == 0:
        return float("nan")
    optimizer = Adam(model.parameters(), lr=lr)
    model.train()
    loader = _loader(_as_tensors(data), batch_size, seed)
    for _ in range(epochs):
        losses = []
        for x, y in loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return float(np.mean(losses))


def distil(
    model: nn.Module,
    inputs: np.ndarray,
    targets: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    temperature: float = 1.0,
    seed: int = 0,
) -> float:
    """Fit ``model`` to target probabilities ``targets`` [P, C] on public ``inputs`` with
    :func:`kd_loss`; returns the mean loss of the last epoch. Public data only: no
    privacy cost."""
    if epochs == 0 or len(inputs) == 0:
        return float("nan")
    optimizer = Adam(model.parameters(), lr=lr)
    model.train()
    tensors = (as_input_tensor(inputs), torch.as_tensor(targets, dtype=torch.float32))
    loader = _loader(tensors, batch_size, seed)
    for _ in range(epochs):
        losses = []
        for x, p in loader:
            optimizer.zero_grad()
            loss = kd_loss(model(x), p, temperature)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return float(np.mean(losses))


def train_joint(
    model: nn.Module,
    data: ArrayDataset,
    public_inputs: np.ndarray,
    targets: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    temperature: float = 1.0,
    kd_weight: float = 1.0,
    seed: int = 0,
) -> float:
    """One objective per step: CE on a private batch + kd_weight * KD on a public batch.

    Each epoch walks the private data once, drawing public batches alongside (cycling
    the public set), which forgets less of the fused knowledge than distilling first and
    training after. Returns the mean loss of the last epoch.
    """
    if epochs == 0 or len(data) == 0:
        return float("nan")
    optimizer = Adam(model.parameters(), lr=lr)
    model.train()
    private = _loader(_as_tensors(data), batch_size, seed)
    public_tensors = (
        as_input_tensor(public_inputs),
        torch.as_tensor(targets, dtype=torch.float32),
    )
    public = _loader(public_tensors, batch_size, seed + 1)
    public_iter = iter(public)
    for _ in range(epochs):
        losses = []
        for x, y in private:
            try:
                px, pt = next(public_iter)
            except StopIteration:
                public_iter = iter(public)
                px, pt = next(public_iter)
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y) + kd_weight * kd_loss(model(px), pt, temperature)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return float(np.mean(losses))


@torch.no_grad()
def predict_logits(model: nn.Module, inputs: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Logits ``[n, C]`` of ``model`` on ``inputs`` (eval mode)."""
    model.eval()
    x = as_input_tensor(inputs)
    return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]).numpy()


def accuracy(model: nn.Module, data: ArrayDataset) -> float:
    """Share of ``data`` that ``model`` classifies correctly (nan for an empty set)."""
    if len(data) == 0:
        return float("nan")
    return float((predict_logits(model, data.x).argmax(axis=1) == data.y).mean())


def prior_weighted_accuracy(predictions: np.ndarray, labels: np.ndarray, *, prior: np.ndarray) -> float:
    """Accuracy on a test set re-weighted to a label distribution ``prior`` [C]:

        A_pi = sum_c pi(c) acc_c / sum_{c present} pi(c),   acc_c = mean_{x: y(x) = c} 1[pred(x) = c]

    the expected accuracy on test inputs drawn with the labels in proportion ``prior``
    (importance weighting under label shift, w(x) = pi(y) / p_test(y); Saerens et al. 2002,
    Lipton et al. 2018). Classes absent from the test set drop out and the rest of ``prior``
    is renormalised. With ``prior`` equal to the test set's own label frequencies this is the
    plain accuracy. nan when no class with prior mass is present.

    fedkd uses it as a companion of a site's local test accuracy in simulations: the site's
    label mix, measured on the shared held-out test set, which has far more examples than a
    site's 4-54-example local test split. It corrects for label shift only: where a site's
    inputs differ from the others' too (digits: each site holds contiguous blocks of the
    dataset, i.e. its own writers), the shared test set also measures how the site's model
    does on inputs from other sites, which its local test split does not."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    prior = np.asarray(prior, dtype=np.float64)
    if prior.ndim != 1 or np.any(~np.isfinite(prior)) or np.any(prior < 0):
        raise ValueError(f"prior must be a 1-d array of finite non-negative weights; got {prior!r}")
    if predictions.shape != labels.shape:
        raise ValueError(f"predictions {predictions.shape} and labels {labels.shape} differ in shape")
    total = weight = 0.0
    for c in np.flatnonzero(prior > 0):
        held = labels == c
        if held.any():
            total += prior[c] * float((predictions[held] == c).mean())
            weight += prior[c]
    return total / weight if weight > 0 else float("nan")


def label_prior(labels: np.ndarray, *, num_classes: int) -> np.ndarray:
    """Label frequencies [num_classes] of ``labels`` (zeros for none)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(np.float64)
    return counts / counts.sum() if counts.sum() > 0 else counts


def prior_accuracy(model: nn.Module, data: ArrayDataset, *, prior: np.ndarray) -> float:
    """:func:`prior_weighted_accuracy` of ``model`` on ``data`` (nan for an empty set)."""
    if len(data) == 0:
        return float("nan")
    return prior_weighted_accuracy(predict_logits(model, data.x).argmax(axis=1), data.y, prior=prior)
