"""fedkd.fedavg: example-weighted weight averaging (the FedAvg reference) and weight sizes."""

from __future__ import annotations

import numpy as np
import pytest

from fedkd.fedavg import average_weights, parameter_count, weight_bytes
from fedkd.models import build_model


def test_average_weights_is_example_weighted_mean():
    a = {"w": np.array([1.0, 2.0], dtype=np.float32), "b": np.array([0.0], dtype=np.float32)}
    b = {"w": np.array([3.0, 6.0], dtype=np.float32), "b": np.array([4.0], dtype=np.float32)}
    out = average_weights([a, b], num_examples=[1, 3])  # (1*a + 3*b) / 4
    np.testing.assert_allclose(out["w"], [2.5, 5.0])
    np.testing.assert_allclose(out["b"], [3.0])
    assert out["w"].dtype == np.float32


def test_average_weights_of_identical_states_is_that_state():
    rng = np.random.default_rng(0)
    state = {"w": rng.normal(size=(3, 4)).astype(np.float32)}
    out = average_weights([state, state, state], num_examples=[5, 1, 7])
    np.testing.assert_allclose(out["w"], state["w"], rtol=1e-6)


def test_average_weights_refuses_mismatches():
    a = {"w": np.zeros(2)}
    with pytest.raises(ValueError, match="shape"):
        average_weights([a, {"w": np.zeros(3)}], num_examples=[1, 1])
    with pytest.raises(ValueError, match="keys"):
        average_weights([a, {"v": np.zeros(2)}], num_examples=[1, 1])
    with pytest.raises(ValueError, match="not all 0"):
        average_weights([a, a], num_examples=[0, 0])


def test_parameter_count_known_answers():
    # mlp-small on digits: 64*32 + 32 + 32*10 + 10 = 2,410 parameters
    model = build_model("mlp-small", input_shape=(64,), num_classes=10, seed=0)
    assert parameter_count(model) == 2410
    assert weight_bytes(model) == 2410 * 4
    # mlp-large: 64*256 + 256 + 256*128 + 128 + 128*10 + 10 = 50,826
    assert parameter_count(build_model("mlp-large", input_shape=(64,), num_classes=10)) == 50826
