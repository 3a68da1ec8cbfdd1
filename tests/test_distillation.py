"""Tests for fedkd.distillation: the KD loss, its gradient, and the training loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedkd.data import ArrayDataset
from fedkd.distillation import (
    accuracy,
    distil,
    kd_loss,
    label_prior,
    predict_logits,
    prior_weighted_accuracy,
    soften,
    train_joint,
    train_supervised,
)
from fedkd.models import build_model



@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_kd_loss_zero_when_student_predicts_the_target_at_temperature_one(temperature):
    # the target is a distribution at T = 1; at any KD temperature the loss vanishes when
    # the student's own (T = 1) prediction equals it
    torch.manual_seed(0)
    z = torch.randn(8, 5, dtype=torch.float64)
    target = torch.softmax(z, dim=-1)
    assert kd_loss(z, target, temperature).item() == pytest.approx(0.0, abs=1e-12)


def test_kd_loss_positive_otherwise():
    torch.manual_seed(1)
    z = torch.randn(8, 5, dtype=torch.float64)
    target = torch.softmax(torch.randn(8, 5, dtype=torch.float64), dim=-1)
    assert kd_loss(z, target, 2.0).item() > 1e-3
    # a student whose softened output equals the unsoftened target is NOT at the optimum
    # (its own prediction would be the target squared: sharper)
    assert kd_loss(2.0 * torch.log(target), target, 2.0).item() > 1e-3


def test_soften_known_answers():
    p = torch.tensor([[0.8, 0.2, 0.0]], dtype=torch.float64)
    # T = 2: proportional to sqrt(p); zeros stay zero
    expected = torch.tensor([[2 / 3, 1 / 3, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(soften(p, 2.0), expected)
    assert soften(p, 1.0) is p


def test_kd_loss_known_answer_t_squared():
    # student logits (0, 0) -> softmax (1/2, 1/2) at any T; target (1, 0) stays (1, 0)
    # when softened: KL = ln 2, times T^2 = 4 at T = 2
    z = torch.zeros(1, 2, dtype=torch.float64)
    target = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    assert kd_loss(z, target, 2.0).item() == pytest.approx(4 * math.log(2), rel=1e-12)
    assert kd_loss(z, target, 1.0).item() == pytest.approx(math.log(2), rel=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kd_loss_equals_manual_batch_mean_kl(temperature):
    torch.manual_seed(2)
    z = torch.randn(6, 4, dtype=torch.float64)
    target = torch.softmax(torch.randn(6, 4, dtype=torch.float64), dim=-1)
    q = torch.softmax(z / temperature, dim=-1).numpy()
    p = target.numpy() ** (1 / temperature)
    p = p / p.sum(axis=1, keepdims=True)
    manual = temperature**2 * np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=1))
    assert kd_loss(z, target, temperature).item() == pytest.approx(manual, rel=1e-10)


def test_distilled_student_reproduces_the_target_instead_of_sharpening_it():
    # knowledge that goes round the federation keeps its shape: a student distilled at
    # T = 2 to soft targets predicts (at T = 1) about those targets, not their square
    torch.manual_seed(5)
    x = np.random.default_rng(5).normal(size=(64, 6)).astype(np.float32)
    target = np.tile(np.array([[0.6, 0.3, 0.1]], dtype=np.float32), (64, 1))
    student = nn.Linear(6, 3)
    distil(student, x, target, epochs=300, batch_size=64, lr=0.05, temperature=2.0, seed=0)
    predicted = torch.softmax(torch.as_tensor(predict_logits(student, x)), dim=-1).numpy().mean(axis=0)
    np.testing.assert_allclose(predicted, [0.6, 0.3, 0.1], atol=0.02)


def test_kd_loss_is_a_per_example_mean():
    torch.manual_seed(3)
    z = torch.randn(4, 3, dtype=torch.float64)
    target = torch.softmax(torch.randn(4, 3, dtype=torch.float64), dim=-1)
    doubled = kd_loss(torch.cat([z, z]), torch.cat([target, target]), 2.0)
    assert doubled.item() == pytest.approx(kd_loss(z, target, 2.0).item(), rel=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_one_sgd_step_raises_probability_of_target_argmax(temperature):
    torch.manual_seed(4)
    student = nn.Linear(5, 4).double()
    x = torch.randn(3, 5, dtype=torch.float64)
    target = torch.full((3, 4), 0.05, dtype=torch.float64)
    target[:, 2] = 0.85  # argmax = class 2
    with torch.no_grad():
        before = torch.softmax(student(x), dim=-1)[:, 2].clone()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    optimizer.zero_grad()
    kd_loss(student(x), target, temperature).backward()
    optimizer.step()
    with torch.no_grad():
        after = torch.softmax(student(x), dim=-1)[:, 2]
    assert (after > before).all(), (before, after)


def test_kd_gradient_on_logits_has_the_right_sign():
    # d/dz [T^2 KL(p_T || softmax(z/T))] = T (softmax(z/T) - p_T), p_T = softmax(log p / T):
    # negative for the target's argmax
    z = torch.zeros(1, 3, dtype=torch.float64, requires_grad=True)
    p = torch.tensor([[0.8, 0.1, 0.1]], dtype=torch.float64)
    kd_loss(z, p, 2.0).backward()
    p_t = p.sqrt() / p.sqrt().sum()
    expected = 2.0 * (torch.full((1, 3), 1 / 3, dtype=torch.float64) - p_t)
    torch.testing.assert_close(z.grad, expected)
    assert z.grad[0, 0] < 0


def _separable(n: int = 60, seed: int = 0) -> ArrayDataset:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=n)
    x = rng.normal(0.0, 0.3, size=(n, 4)).astype(np.float32)
    x[:, 0] += np.where(y == 1, 2.0, -2.0)
    return ArrayDataset(x, y.astype(np.int64), np.arange(n))


def _ce(model: nn.Module, data: ArrayDataset) -> float:
    with torch.no_grad():
        return F.cross_entropy(model(torch.as_tensor(data.x)), torch.as_tensor(data.y)).item()


def test_train_supervised_lowers_the_loss_and_learns():
    data = _separable()
    model = build_model("mlp-small", input_shape=(4,), num_classes=2, seed=0)
    before = _ce(model, data)
    last_epoch = train_supervised(model, data, epochs=15, batch_size=16, lr=0.01, seed=0)
    after = _ce(model, data)
    assert math.isfinite(last_epoch)
    assert after < 0.5 * before
    assert last_epoch < before
    assert accuracy(model, data) == 1.0


def test_train_supervised_is_reproducible():
    data = _separable()
    losses = []
    for _ in range(2):
        model = build_model("mlp-small", input_shape=(4,), num_classes=2, seed=1)
        losses.append(train_supervised(model, data, epochs=2, batch_size=16, lr=0.01, seed=3))
    assert losses[0] == losses[1]


def test_distil_moves_the_student_towards_the_targets():
    rng = np.random.default_rng(5)
    inputs = rng.normal(size=(40, 6)).astype(np.float32)
    targets = rng.dirichlet(np.full(3, 0.3), size=40).astype(np.float32)
    model = build_model("mlp-small", input_shape=(6,), num_classes=3, seed=0)

    def current_loss():
        with torch.no_grad():
            return kd_loss(model(torch.as_tensor(inputs)), torch.as_tensor(targets), 1.0).item()

    before = current_loss()
    distil(model, inputs, targets, epochs=20, batch_size=8, lr=0.01, temperature=1.0)
    assert current_loss() < 0.7 * before


def test_train_joint_runs_and_learns():
    data = _separable()
    rng = np.random.default_rng(6)
    public = rng.normal(size=(20, 4)).astype(np.float32)
    targets = np.tile([0.5, 0.5], (20, 1)).astype(np.float32)
    model = build_model("mlp-small", input_shape=(4,), num_classes=2, seed=0)
    loss = train_joint(model, data, public, targets, epochs=10, batch_size=16, lr=0.01, kd_weight=0.5)
    assert math.isfinite(loss)
    assert accuracy(model, data) >= 0.95


def test_zero_epochs_or_no_data_returns_nan_and_leaves_model():
    data = _separable()
    model = build_model("mlp-small", input_shape=(4,), num_classes=2, seed=0)
    snapshot = [p.detach().clone() for p in model.parameters()]
    empty = data.subset(np.array([], dtype=np.int64))
    assert math.isnan(train_supervised(model, data, epochs=0, batch_size=8, lr=0.1))
    assert math.isnan(train_supervised(model, empty, epochs=3, batch_size=8, lr=0.1))
    assert math.isnan(distil(model, data.x[:0], np.zeros((0, 2)), epochs=3, batch_size=8, lr=0.1))
    for before, after in zip(snapshot, model.parameters()):
        assert torch.equal(before, after)


def test_accuracy_on_empty_dataset_is_nan():
    model = build_model("mlp-small", input_shape=(4,), num_classes=2, seed=0)
    empty = ArrayDataset(np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64))
    assert math.isnan(accuracy(model, empty))


def test_accuracy_known_answer():
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))  # predicts argmax of the input
    x = np.array([[1, 0], [0, 1], [1, 0], [0, 1]], dtype=np.float32)
    y = np.array([0, 1, 1, 1], dtype=np.int64)
    assert accuracy(model, ArrayDataset(x, y, np.arange(4))) == 0.75


def test_predict_logits_batches_match_one_pass():
    model = build_model("mlp-small", input_shape=(4,), num_classes=3, seed=0)
    x = np.random.default_rng(7).normal(size=(10, 4)).astype(np.float32)
    np.testing.assert_allclose(predict_logits(model, x, batch_size=3), predict_logits(model, x), rtol=1e-6)
    assert predict_logits(model, x).shape == (10, 3)


def test_adam_gives_torch_adams_parameters_bit_for_bit():
    """fedkd's Adam is torch.optim.Adam's kernel with its defaults: the same parameters after
    every step, for a model with a parameter that gets no gradient (it is left alone)."""
    from fedkd.distillation import Adam

    torch.manual_seed(0)
    ours, theirs = build_model("mlp-small", input_shape=(64,), num_classes=10, seed=3), \
        build_model("mlp-small", input_shape=(64,), num_classes=10, seed=3)
    frozen = [nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))]  # never in the loss
    a = Adam([*ours.parameters(), frozen[0]], lr=0.003)
    b = torch.optim.Adam([*theirs.parameters(), frozen[1]], lr=0.003)
    x, y = torch.randn(64, 64), torch.randint(0, 10, (64,))
    for _ in range(5):
        for model, opt in ((ours, a), (theirs, b)):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    for p, q in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(p, q)
    assert torch.equal(frozen[0], torch.ones(3))


def test_training_without_dp_does_not_import_the_torch_compiler():
    """torch.optim.Optimizer imports torch._dynamo on first use (seconds per process); the
    training functions do without it (a fresh interpreter: this one may have it already)."""
    import subprocess
    import sys

    code = ("import sys, numpy as np\n"
            "from fedkd.data import ArrayDataset\n"
            "from fedkd.distillation import train_supervised, distil, train_joint\n"
            "from fedkd.models import build_model\n"
            "m = build_model('mlp-small', input_shape=(64,), num_classes=10, seed=0)\n"
            "d = ArrayDataset(np.random.rand(40, 64).astype('float32'), np.arange(40) % 10, np.arange(40))\n"
            "p = np.full((20, 10), 0.1)\n"
            "train_supervised(m, d, epochs=1, batch_size=8, lr=0.01)\n"
            "distil(m, d.x[:20], p, epochs=1, batch_size=8, lr=0.01)\n"
            "train_joint(m, d, d.x[:20], p, epochs=1, batch_size=8, lr=0.01)\n"
            "print('torch._dynamo' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False"]


# ------------------------------------------------------------ prior-weighted accuracy


def test_prior_weighted_accuracy_known_answers():
    labels = np.array([0, 0, 1, 1, 2])
    predictions = np.array([0, 1, 1, 1, 0])  # per class: 1/2, 2/2, 0/1
    assert prior_weighted_accuracy(predictions, labels, prior=np.array([0.5, 0.5, 0.0])) == pytest.approx(0.75)
    assert prior_weighted_accuracy(predictions, labels, prior=np.array([0.2, 0.3, 0.5])) == pytest.approx(0.4)
    # the test set's own label frequencies give the plain accuracy, 3 / 5
    assert prior_weighted_accuracy(predictions, labels, prior=np.array([2, 2, 1]) / 5) == pytest.approx(0.6)
    # a class the test set lacks drops out, the rest renormalised: class 0 alone, 1/2
    assert prior_weighted_accuracy(predictions, labels, prior=np.array([0.5, 0.0, 0.0, 0.5])) == pytest.approx(0.5)
    assert np.isnan(prior_weighted_accuracy(predictions, labels, prior=np.array([0.0, 0.0, 0.0, 1.0])))


@pytest.mark.parametrize("prior", [np.array([0.5, -0.1, 0.6]), np.array([np.nan, 1.0, 0.0]), np.ones((2, 3))])
def test_prior_weighted_accuracy_refuses_bad_priors(prior):
    with pytest.raises(ValueError, match="prior must be"):
        prior_weighted_accuracy(np.array([0, 1]), np.array([0, 1]), prior=prior)


def test_label_prior_is_the_frequencies():
    assert label_prior(np.array([2, 2, 0, 2]), num_classes=4).tolist() == [0.25, 0.0, 0.75, 0.0]
    assert label_prior(np.array([], dtype=np.int64), num_classes=2).tolist() == [0.0, 0.0]
