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

    for key, value in (("audit.enabled", True), ("checkpoint.resume", True), ("identity.site-keys", "keys")):
        with pytest.raises(ValueError, match=f"does not support {key}"):
            run_floor(small_run_config("x", **{key: value}))


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


def _pld(history, delta):  # noqa: ANN001, ANN202  an independent accountant (Google's dp_accounting)
    dp_accounting = pytest.importorskip("dp_accounting")
    from dp_accounting.pld.pld_privacy_accountant import PLDAccountant

    accountant = PLDAccountant(value_discretization_interval=1e-4)
    for sigma, q, steps in history:
        accountant.compose(dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), int(steps)))
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize("lost", [False, True], ids=["site-state-kept", "site-state-lost"])
def test_an_extended_private_run_stops_every_site_at_its_target(small_run_config, lost):
    """A 2-round DP run, resumed with 4 rounds. Kept site state: the sites keep the plan
    they started with and report dp-stopped (no PrivacyStateError). Lost site state (fresh
    SiteStates, which would plan a whole new budget): the server's recorded history goes
    back in the inbox and the sites stop too. Either way each site's composed epsilon,
    composed here with an independent accountant (dp_accounting's PLD; the run's default is
    PRV) over the server's recorded history, is at or under its target (to PLD's 0.1%
    discretisation)."""
    import dataclasses
    from pathlib import Path

    from fedkd.data import load_federation
    from fedkd.federation.loop import run_federation
    from fedkd.federation.server import ServerState
    from fedkd.reporting import RunRecorder
    from simulations.floor import InProcessTransport

    config = small_run_config("dp-extend", **{"privacy.enabled": True, "privacy.target-epsilon": 2.0,
                                              "fusion.method": "mean", "global-student.enabled": False,
                                              "data.num-clients": 3, "min-clients": 2,
                                              "model.architectures": "mlp-small", "train.distill-epochs": 1})
    split = load_federation(config.data, config.seed)
    transport = InProcessTransport(config, split)
    runs = Path(config.output_dir)
    first = run_federation(config=config, split=split, transport=transport,
                           recorder=RunRecorder(runs / "first", config.to_toml()))
    assert first["status"] == "completed"
    before = {int(c): row for c, row in first["privacy"]["ledger"].items()}
    assert all(row["epsilon-spent"] > 0.9 * 2.0 for row in before.values())  # the budget is spent

    extended = dataclasses.replace(config, num_server_rounds=4)
    state = ServerState()
    arrays, meta = ServerState(privacy=dict(before), completed_round=2).state_dict()
    state.load_state_dict(arrays, meta, round_number=2)
    again = InProcessTransport(extended, split)
    if not lost:
        again.states = transport.states  # each site's state as it left round 2
    summary = run_federation(config=extended, split=split, transport=again, state=state,
                             recorder=RunRecorder(runs / "second", extended.to_toml()))
    assert summary["status"] == "completed" and summary["dropouts"] == []
    for client, row in summary["privacy"]["ledger"].items():
        composed = _pld(row["history"], row["delta"])
        assert composed <= row["target-epsilon"] * 1.001, (client, composed)
        assert row["epsilon-spent"] >= before[int(client)]["epsilon-spent"]  # never a decrease
        assert row["stopped"]
        assert row["steps"] == before[int(client)]["steps"]  # no private step after the budget
