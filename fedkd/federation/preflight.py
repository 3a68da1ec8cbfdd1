"""Checks made once, before a run starts, so that a run that cannot work fails in one line
instead of in every round on every site.

:func:`check_site_models` builds each model the run uses (every site's architecture, the
teachers, the global student) on the federation's data and passes two of a site's private
examples and two public examples through it: a model that cannot read the data (``cnn-small``
on 13 tabular features, a plugin whose forward fails) is refused naming the first site that
uses it and the cause. Plugins that cannot be imported were refused by the config already
(:mod:`fedkd.plugins`).
"""

from __future__ import annotations

import torch

from fedkd.config import Config, ConfigError
from fedkd.data import FederatedSplit
from fedkd.models import build_model


def _uses(config: Config, split: FederatedSplit) -> list[tuple[str, str, int]]:
    """``(what, model name, site)`` for each distinct model: the first site that uses it."""
    uses: dict[str, tuple[str, str, int]] = {}
    for client in range(len(split.clients)):
        for what, name in (("model", config.architecture_for(client)), ("teacher", config.teacher_for(client))):
            if name and name not in uses:
                uses[name] = (what, name, client)
    if config.global_student.enabled and config.global_student.model not in uses:
        uses[config.global_student.model] = ("global student", config.global_student.model, -1)
    return list(uses.values())


def check_site_models(*, config: Config, split: FederatedSplit) -> None:
    """Raise one :class:`ConfigError` line per model that cannot be built on ``split``'s data
    or cannot map a batch of its inputs to ``[B, num_classes]`` logits."""
    problems = []
    for what, name, client in _uses(config, split):
        where = "the server's global student" if client < 0 else f"site {client}'s {what}"
        data = split.clients[client].train if client >= 0 else split.public
        shape = f"inputs {list(split.input_shape)}, {split.num_classes} classes"
        try:
            model = build_model(name, input_shape=split.input_shape, num_classes=split.num_classes,
                                seed=0, **split.model_options)
            model.eval()
            with torch.no_grad():
                for x in (data.x[:2], split.public.x[:2]):
                    out = model(torch.as_tensor(x))
                    if tuple(out.shape) != (len(x), split.num_classes):
                        raise ValueError(f"gives outputs {list(out.shape)}, not [{len(x)}, {split.num_classes}]")
        except Exception as err:  # noqa: BLE001  whatever the model raises is the cause, in one line
            cause = str(err).strip().splitlines()[0] if str(err).strip() else ""
            problems.append(f"{where} '{name}' cannot read the data ({shape}): {type(err).__name__}"
                            + (f": {cause}" if cause else ""))
    if problems:
        raise ConfigError(problems)
