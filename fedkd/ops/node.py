"""A deployed site's own settings: its node config, checked, and the data it loads.

Under Flower's deployment engine every SuperNode is started with its own node config
(``flower-supernode --node-config 'partition-id=0 data-path="/srv/site-0.npz"'`` or a
TOML file): which partition it holds, where its data is, which model it runs, where
it keeps its state. Simulated sites get only ``partition-id`` (and ``num-partitions``).
:func:`site_settings` checks a node config; :func:`load_site_split` loads what the site
works with. No Flower imports.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedkd.config import Config, ConfigError
from fedkd.data import FederatedSplit
from fedkd.seeds import NOISE_SEEDS, resolve_noise_seed, site_seed

SIMULATED_NODE_KEYS = frozenset({"partition-id", "num-partitions"})
"""The node config Flower's simulation engine gives every simulated site, and nothing else."""


def is_simulated(node_config: Mapping[str, Any]) -> bool:
    """True when ``node_config`` is exactly what Flower's simulation engine sets
    (:data:`SIMULATED_NODE_KEYS`); any other node config is a deployed SuperNode's,
    written by its operator. Used to resolve ``privacy.noise-seed = "auto"``: a site is
    taken to be deployed unless it is positively a simulated one."""
    return set(node_config) == SIMULATED_NODE_KEYS


def site_noise_seed(config: Config, node_config: Mapping[str, Any], settings: SiteSettings) -> str:
    """The noise source of this site (:func:`fedkd.seeds.resolve_noise_seed`): its node
    config's ``noise-seed``, else the run config's ``privacy.noise-seed`` (``auto``:
    site-secret when deployed, run-seed when simulated; never run-seed when deployed
    unless the site's own node config says so)."""
    return resolve_noise_seed(config.privacy.noise_seed, deployed=not is_simulated(node_config),
                              site_choice=settings.noise_seed)

NODE_CONFIG_KEYS = {
    "partition-id": "this site's id, 0..data.num-clients-1 (required)",
    "data-path": "the site's private data, an .npz file (fedkd deploy export-partitions writes one)",
    "public-path": "the public transfer set, an .npz file (the same file on every host)",
    "dataset": "rebuild the federation's split from this dataset instead of data.dataset",
    "dataset-path": "this host's copy of the dataset (save_to_disk folder) instead of data.path",
    "model": "this site's architecture instead of its turn in model.architectures",
    "state-dir": "folder where the site keeps its state after each round (rejoin, resume) and its noise secret",
    "noise-seed": "where this site's DP and shielding noise come from: site-secret (deployment default), "
                  "secure-rng or run-seed (reproducible by the server); overrides privacy.noise-seed",
    "identity-key": "this site's private key (the SuperNode key, OpenSSH); its replies are signed with it "
                    "(identity.site-keys on the server); fedkd deploy supernode sets it to --key",
    "num-partitions": "set by Flower's simulation engine; not used",
}


@dataclass(frozen=True)
class SiteSettings:
    """A site's node config, checked (see ``NODE_CONFIG_KEYS``)."""

    partition_id: int
    data_path: str = ""
    public_path: str = ""
    dataset: str = ""
    dataset_path: str = ""
    model: str = ""
    state_dir: str = ""
    noise_seed: str = ""
    identity_key: str = ""

    @property
    def uses_local_files(self) -> bool:
        return bool(self.data_path or self.public_path or self.dataset or self.dataset_path)


def site_settings(node_config: Mapping[str, Any], *, num_clients: int) -> SiteSettings:
    """Check a node config; raise one :class:`ConfigError` listing every problem."""
    import difflib

    from fedkd.models import MODELS

    problems = []
    for key in node_config:
        if key not in NODE_CONFIG_KEYS:
            close = difflib.get_close_matches(key, NODE_CONFIG_KEYS, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            problems.append(f"node config {key}: unknown key{hint} (known: {', '.join(NODE_CONFIG_KEYS)})")
    value = node_config.get("partition-id")
    if value is None:
        problems.append("node config partition-id: required (which data partition this site holds)")
    elif isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) != int(value) \
            or not 0 <= int(value) < num_clients:
        problems.append(
            f"node config partition-id: must be an integer in 0..{num_clients - 1} "
            f"(data.num-clients is {num_clients}); got {value!r}"
        )
    strings = {}
    for key in ("data-path", "public-path", "dataset", "dataset-path", "model", "state-dir", "noise-seed",
                "identity-key"):
        text = node_config.get(key, "")
        if not isinstance(text, str):
            problems.append(f"node config {key}: must be a string (quote it: {key}=\"...\"); got {text!r}")
        else:
            strings[key.replace("-", "_")] = text.strip()
    if strings.get("model") and strings["model"] not in MODELS.names():
        from fedkd.plugins import PluginError, is_plugin_path, load_plugin

        if not is_plugin_path(strings["model"]):
            problems.append(f"node config model: must be one of {', '.join(MODELS.names())} or an import "
                            f"path package.module:Model; got {strings['model']!r}")
        else:
            try:
                load_plugin(strings["model"], kind="model")
            except PluginError as err:
                problems.append(f"node config model: {err}")
    if strings.get("noise_seed") and strings["noise_seed"] not in NOISE_SEEDS:
        problems.append(f"node config noise-seed: must be one of {', '.join(NOISE_SEEDS)}; got {strings['noise_seed']!r}")
    if strings.get("identity_key"):
        from fedkd.identity import IdentityError, load_private_key

        try:
            load_private_key(strings["identity_key"])
        except IdentityError as err:
            problems.append(f"node config identity-key: {err}")
    if problems:
        raise ConfigError(problems)
    return SiteSettings(partition_id=int(value), **strings)


def load_site_split(config: Config, settings: SiteSettings) -> FederatedSplit:
    """:func:`_load_site_split`, and with ``audit.enabled`` the audited site's private data
    as the audit plan fixes it (candidates each kept w.p. 1/2, secret inserted;
    :func:`fedkd.audit.canaries.with_audit`)."""
    split = _load_site_split(config, settings)
    if config.audit.enabled and settings.partition_id == config.audit.site:
        from fedkd.audit.canaries import with_audit

        split = with_audit(config, split)
    return split


def _load_site_split(config: Config, settings: SiteSettings) -> FederatedSplit:
    """The data a site works with, from its settings.

    Without local-data keys: the federation's split rebuilt from the run config (the
    simulation's way). ``dataset``/``dataset-path`` rebuild it from this host's copy.
    ``public-path`` and ``data-path`` read the public set and the site's private data
    from files; with both, the site needs nothing else (no other site's data, no copy of
    the whole dataset). ``data.standardize`` is applied to what the site then holds:
    ``public`` gives exactly the simulation's scaling; ``private`` fits on the site's own
    training part (the pooled private data of a simulation is on no single host). Whichever way, the train handler compares the public set's
    fingerprint with the server's and refuses to take part when they differ.
    """
    from fedkd.data import load_federation, load_public_file, load_site_file, site_view, transfer_set
    from fedkd.data.own import standardize_split

    client = settings.partition_id
    if not settings.uses_local_files:
        return load_federation(config.data, config.seed)
    split = None
    if not (settings.public_path and settings.data_path):
        data_config = dataclasses.replace(
            config.data,
            standardize="none",  # files are read as written: the site's view is scaled once, below
            dataset=settings.dataset or config.data.dataset,
            path=settings.dataset_path or (config.data.path if not settings.dataset else ""),
        )
        split = load_federation(data_config, config.seed)
    if settings.public_path:  # the file holds the public set as exported, without the jittered copies
        public, num_classes = load_public_file(settings.public_path)
        public = transfer_set(public, config.data, config.seed)
    else:
        public, num_classes = split.public, split.num_classes
    if settings.data_path:
        d = config.data
        data = load_site_file(
            settings.data_path, partition_id=client, num_classes=num_classes,
            input_shape=tuple(public.x.shape[1:]), val_fraction=d.val_fraction,
            local_test_fraction=d.local_test_fraction, seed=site_seed(config.seed, client),
        )
    else:
        data = split.clients[client]
    text = None
    if split is not None:
        text = split.text
    else:
        from fedkd.data.text import is_text_dataset, vocab_info

        if is_text_dataset(config.data.dataset):  # token ids: the model needs the vocabulary
            text = vocab_info(config.data.tokenizer)
    view = site_view(public=public, client=client, data=data, num_classes=num_classes, text=text)
    if config.data.standardize != "none":  # "private": fitted on this site's own training part
        view = standardize_split(view, fit_on=config.data.standardize)
    return view
