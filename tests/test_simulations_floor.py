"""simulations/floor.py: the in-process runner and FedAvg (no Flower). The in-process
transport against Flower's is tests/e2e/test_e2e_transports.py."""

from __future__ import annotations

import pytest

from fedkd.reporting import read_summary


def test_fedavg_runner_runs_and_reports(small_run_config):
    from simulations.floor import run_fedavg

    config = small_run_config("fedavg", **{"model.architectures": "mlp-small"})
    summary = read_summary(run_fedavg(config))
    assert summary["method"] == "fedavg"
    assert summary["bytes"]["uplink-per-client-round"] == 2410 * 4
    assert 0.0 <= summary["final"]["worst"] <= summary["final"]["alma"] <= 1.0
    with pytest.raises(ValueError, match="one architecture"):
        run_fedavg(small_run_config("mixed"))


def test_in_process_runner_refuses_what_it_cannot_do(small_run_config):
    from simulations.floor import run_floor

    for key in ("audit.enabled", "checkpoint.resume"):
        with pytest.raises(ValueError, match=f"does not support {key}"):
            run_floor(small_run_config("x", **{key: True}))


def test_a_failing_site_is_excluded_for_the_round_not_the_run(small_run_config):
    """A site whose round raises is a failed reply, as under Flower: excluded, logged, and the
    round goes on with the others (here: site 2's stored state cannot be loaded)."""
    from fedkd.data import load_federation
    from fedkd.federation.site import SiteInbox
    from simulations.floor import InProcessTransport

    config = small_run_config("fail")
    split = load_federation(config.data, config.seed)
    transport = InProcessTransport(config, split)
    transport.states[2] = {"model": {}, "rounds-trained": 0}  # an unreadable state for site 2

    def inbox(client):  # noqa: ANN001, ANN202
        return SiteInbox(round_number=1, public_fingerprint=split.public_fingerprint, config_digest=config.digest())

    replies = transport.train(1, inbox)
    assert [r.node for r in replies] == [0, 1, 2, 3]
    assert [r.error is None for r in replies] == [True, True, False, True]
    assert replies[2].error.startswith("site failed: RuntimeError")
