"""The in-process runner: the federation's one round loop over an in-process transport, no Flower.

``run_floor(config)`` runs :func:`fedkd.federation.loop.run_federation` -- the loop the
ServerApp runs -- with :class:`InProcessTransport`, which calls each site's
:func:`~fedkd.federation.site.site_round` directly, one site after another in this process,
and keeps each site's :class:`~fedkd.federation.site.SiteState` as a state dict between
rounds, as the ClientApp keeps it in ``context.state``. With the same config and seeds it
gives the same numbers as ``fedkd simulate`` (tests/e2e/test_e2e_transports.py checks this number for
number), so it serves two purposes:

* the *floor* of the speed benchmark: simulation time / in-process time is the framework's
  overhead (Flower, Ray, messages, processes);
* a fast runner for large benchmark grids (``simulations/benchmark.py``).

``run_fedavg(config)`` runs FedAvg (weight averaging, :mod:`fedkd.fedavg`) on the same
split with one architecture for every site: the weight-sharing reference.

Both run sites with one torch thread, as each simulated site does
(``torch.set_num_threads(1)`` in the ClientApp).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fedkd.config import Config
from fedkd.data import FederatedSplit, load_federation
from fedkd.distillation import accuracy, train_supervised
from fedkd.fedavg import average_weights, weight_bytes
from fedkd.federation.loop import Reply, record_evaluation, round_clients, run_federation
from fedkd.federation.preflight import check_site_models
from fedkd.federation.server import ServerState, privacy_row, run_summary
from fedkd.federation.site import (
    NoiseSource,
    SiteInbox,
    SiteState,
    build_site_model,
    evaluate_site,
    prior_test,
    site_evaluation,
    site_round,
)
from fedkd.models import build_model
from fedkd.privacy import PrivacyLedger, check_privacy_plans, ledger_metrics, site_privacy_plan, train_private_site
from fedkd.reporting import RunRecorder
from fedkd.seeds import new_site_secret, resolve_noise_seed, site_seed


class InProcessTransport:
    """:class:`fedkd.federation.loop.Transport` that runs every site in this process.

    Site c is node c. Each site's state lives here between rounds as
    :meth:`SiteState.state_dict` (rebuilt and reloaded every round, as the ClientApp rebuilds
    it from ``context.state``). A site whose round raises is a failed reply, as a ClientApp
    exception is under Flower."""

    def __init__(self, config: Config, split: FederatedSplit) -> None:
        self.config, self.split = config, split
        self.states: dict[int, dict[str, Any]] = {}
        kind = resolve_noise_seed(config.privacy.noise_seed, deployed=False)  # a simulation
        self.noise = {c: NoiseSource(kind, new_site_secret() if kind == "site-secret" else None)
                      for c in range(config.data.num_clients)}  # each site's secret, in memory only

    def _state(self, client: int) -> SiteState:
        state = SiteState.fresh(config=self.config, split=self.split, client=client, noise=self.noise[client])
        if client in self.states:
            state.load_state_dict(self.states[client])
        return state

    def wait_for_sites(self) -> int:
        return self.config.data.num_clients

    def _clients(self, clients: frozenset[int] | None) -> list[int]:
        return list(range(self.config.data.num_clients)) if clients is None else sorted(clients)

    def train(self, round_number: int, inbox_for: Callable[[int | None], SiteInbox], *,
              clients: frozenset[int] | None = None) -> list[Reply]:
        replies = []
        for client in self._clients(clients):
            inbox = inbox_for(client)
            try:
                state = self._state(client)
                reply = site_round(config=self.config, split=self.split, client=client, inbox=inbox, state=state)
            except Exception as err:  # noqa: BLE001  as Flower turns a ClientApp exception into an error reply
                replies.append(Reply(node=client, error=f"site failed: {type(err).__name__}: {err}"))
                continue
            self.states[client] = state.state_dict()
            replies.append(Reply(node=client, metrics=reply.metrics, arrays=reply.arrays,
                                 records=frozenset({"knowledge", "metrics"})))
        return replies

    def evaluate(self, round_number: int, *, clients: frozenset[int] | None = None) -> list[Reply]:
        replies = []
        for client in self._clients(clients):
            try:
                metrics = site_evaluation(config=self.config, split=self.split, client=client,
                                          state=self._state(client))
            except Exception as err:  # noqa: BLE001
                replies.append(Reply(node=client, error=f"site failed: {type(err).__name__}: {err}"))
                continue
            replies.append(Reply(node=client, metrics=metrics, records=frozenset({"metrics"})))
        return replies

    def query(self, round_number: int) -> list[Reply]:
        return []  # node c is site c: no node to ask

    def identified(self, node: int, client: int) -> None:
        pass  # node c is site c

    def client_of(self, node: int) -> int | None:
        return node


def floor_run_dir(config: Config) -> Path:
    if not config.run_name:
        raise ValueError("the in-process runner needs a run-name (its run directory under output-dir)")
    return Path(config.output_dir).resolve() / config.run_name


def _recorder(config: Config) -> RunRecorder:
    run_dir = floor_run_dir(config)
    if run_dir.exists() and any(run_dir.iterdir()):
        raise FileExistsError(f"run directory {run_dir} is not empty; choose another run-name")
    recorded = dataclasses.replace(config, checkpoint=dataclasses.replace(config.checkpoint, resume=False))
    return RunRecorder(run_dir, recorded.to_toml())


def _one_thread(run: Callable[[], Path]) -> Path:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run()
    finally:
        torch.set_num_threads(threads)


def run_floor(config: Config) -> Path:
    """Run ``config``'s federation in this process (see module doc); returns the run directory."""
    for setting, on in (("audit.enabled", config.audit.enabled), ("checkpoint.resume", config.checkpoint.resume),
                        ("identity.site-keys", bool(config.identity.site_keys))):
        if on:
            raise ValueError(f"the in-process runner does not support {setting}; use the simulation "
                             "engine (fedkd simulate --runner flower)")

    def run() -> Path:
        split = load_federation(config.data, config.seed)
        check_privacy_plans(config, [len(c.train) for c in split.clients])
        check_site_models(config=config, split=split)
        recorder = _recorder(config)
        run_federation(config=config, split=split, transport=InProcessTransport(config, split),
                       recorder=recorder, runner="floor")
        return recorder.run_dir

    return _one_thread(run)


# ------------------------------------------------------------------ FedAvg


def run_fedavg(config: Config) -> Path:
    """FedAvg on ``config``'s split (one architecture, ``model.architectures``; see
    :mod:`fedkd.fedavg`): every round each site starts from the global weights, trains
    ``train.local-epochs`` epochs on its private data (DP-SGD with ``privacy.local-epochs`` and
    ``privacy.lr`` through its ledger when ``privacy.enabled``; the same private steps, hence
    the same epsilon, as a knowledge site), and the server averages the weights by private
    example counts. ALMA: the global model on each site's local test split;
    ``global-accuracy``: the global model on the global test set. Bytes: the weights,
    float32, each way."""
    names = {name.strip() for name in config.model.architectures.split(",")}
    if len(names) != 1:
        raise ValueError(f"FedAvg needs one architecture for every site; model.architectures is "
                         f"'{config.model.architectures}'")
    return _one_thread(lambda: _run_fedavg(config, names.pop()))


def _run_fedavg(config: Config, architecture: str) -> Path:
    split = load_federation(config.data, config.seed)
    check_privacy_plans(config, [len(c.train) for c in split.clients])
    recorder = _recorder(config)
    state = ServerState()
    n, t = config.data.num_clients, config.train
    global_model = build_model(architecture, input_shape=split.input_shape, num_classes=split.num_classes,
                               seed=config.seed, **split.model_options)
    ledgers = [
        PrivacyLedger(site_privacy_plan(config, len(split.clients[c].train), c)) if config.privacy.enabled else None
        for c in range(n)
    ]
    size = weight_bytes(global_model)
    state.bytes_up, state.bytes_down = [size] * n, [size] * n
    for r in range(1, config.num_server_rounds + 1):
        round_start = time.monotonic()
        global_state = {k: v.detach().clone() for k, v in global_model.state_dict().items()}
        states, counts = [], []
        sample = round_clients(config, r)
        for c in range(n) if sample is None else sorted(sample):
            model = build_site_model(config, split, c)
            model.load_state_dict(global_state)
            seed = site_seed(config.seed, c, r)
            metrics: dict[str, float] = {}
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                if ledgers[c] is None:
                    metrics["train-loss"] = train_supervised(model, split.clients[c].train, epochs=t.local_epochs,
                                                             batch_size=t.batch_size, lr=t.lr, seed=seed)
                else:
                    private = train_private_site(model, split.clients[c].train, config=config,
                                                 ledger=ledgers[c], lr=config.privacy.lr, seed=seed)
                    metrics.update(ledger_metrics(ledgers[c], round_steps=private.steps, stopped=private.stopped))
                    metrics["train-loss"] = private.loss
                    state.privacy[c] = privacy_row(config=config, metrics=metrics, previous=state.privacy.get(c))
            recorder.record("client-train", round=r, client=c, **metrics)
            states.append({k: v.detach().numpy() for k, v in model.state_dict().items()})
            counts.append(float(len(split.clients[c].train)))
        averaged = average_weights(states, num_examples=counts)
        global_model.load_state_dict({k: torch.from_numpy(v) for k, v in averaged.items()})
        entry: dict = {"round": r, "accepted": list(range(n)) if sample is None else sorted(sample),
                       "global-accuracy": accuracy(global_model, split.test)}
        if r % config.eval_every == 0 or r == config.num_server_rounds:
            replies = [Reply(node=c, metrics={"partition-id": c, **evaluate_site(global_model, split.clients[c], **prior_test(split, c))})
                       for c in range(n)]
            entry.update(record_evaluation(config=config, recorder=recorder, round_number=r, replies=replies))
        entry["seconds"] = time.monotonic() - round_start
        recorder.record("round", **entry)
        state.history.append(entry)
    summary = run_summary(config=config, split=split, state=state, status="completed", method="fedavg",
                          runner="floor")
    summary["model"] = architecture
    recorder.finish(summary)
    return recorder.run_dir
