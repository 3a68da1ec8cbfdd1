"""Tests for fedkd.models: the registry of site architectures."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedkd.models import MODELS, SmallCNN, build_model, model_modality

EXPECTED = {"mlp-small", "mlp-large", "cnn-small"}
VECTOR_MODELS = [n for n in MODELS.names() if model_modality(n) == "vector"]
"""Models of float inputs (text models, which read token ids, are tested in test_models_text.py)."""


def test_registered_models():
    assert EXPECTED <= set(VECTOR_MODELS)
    assert {"minilm", "bert-tiny", "bert-mini"} <= set(MODELS.names()) - set(VECTOR_MODELS)


@pytest.mark.parametrize("name", VECTOR_MODELS)
def test_digits_batch_maps_to_logits(name):
    model = build_model(name, input_shape=(64,), num_classes=10, seed=0)
    x = torch.rand(7, 64)
    out = model(x)
    assert out.shape == (7, 10)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    # a batch of one works too (GroupNorm, not BatchNorm)
    assert model(x[:1]).shape == (1, 10)


@pytest.mark.parametrize("name", VECTOR_MODELS)
def test_gradients_reach_every_parameter(name):
    model = build_model(name, input_shape=(64,), num_classes=10, seed=0)
    model(torch.rand(4, 64)).sum().backward()
    for param_name, p in model.named_parameters():
        assert p.grad is not None, param_name


@pytest.mark.parametrize("input_shape", [(1, 28, 28), (28, 28), (784,)])
def test_cnn_small_handles_28x28_images(input_shape):
    model = build_model("cnn-small", input_shape=input_shape, num_classes=10, seed=0)
    out = model(torch.rand(3, *input_shape))
    assert out.shape == (3, 10)


def test_cnn_small_handles_colour_images():
    model = build_model("cnn-small", input_shape=(3, 32, 32), num_classes=10, seed=0)
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_cnn_small_rejects_non_square_flat_input():
    with pytest.raises(ValueError, match="square"):
        SmallCNN(input_shape=(63,), num_classes=10)


@pytest.mark.parametrize("name", VECTOR_MODELS)
def test_same_seed_same_initial_weights(name):
    a = build_model(name, input_shape=(64,), num_classes=10, seed=3)
    b = build_model(name, input_shape=(64,), num_classes=10, seed=3)
    c = build_model(name, input_shape=(64,), num_classes=10, seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_seeded_build_does_not_touch_the_global_rng():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    build_model("mlp-large", input_shape=(64,), num_classes=10, seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_num_classes_is_respected():
    model = build_model("mlp-small", input_shape=(64,), num_classes=4, seed=0)
    assert model(torch.rand(2, 64)).shape == (2, 4)


def test_unknown_model_lists_names():
    with pytest.raises(ValueError, match="unknown model 'resnet-9000'") as err:
        build_model("resnet-9000", input_shape=(64,), num_classes=10)
    for name in EXPECTED:
        assert name in str(err.value)


@pytest.mark.parametrize("name", VECTOR_MODELS)
def test_no_batch_norm(name):
    # Opacus cannot compute per-example gradients through BatchNorm (it mixes examples)
    model = build_model(name, input_shape=(64,), num_classes=10, seed=0)
    norms = (nn.modules.batchnorm._BatchNorm, nn.SyncBatchNorm, nn.modules.instancenorm._InstanceNorm)
    offending = [type(m).__name__ for m in model.modules() if isinstance(m, norms)]
    assert offending == []
    # and no running statistics (buffers) that a batch could leak into
    assert list(model.buffers()) == []
