"""simulations/micro/public_ceiling.py: the oracle ceilings of knowledge-only methods."""

from __future__ import annotations

import numpy as np

from fedkd.config import load_config
from fedkd.data import load_federation
from simulations.micro.public_ceiling import ceilings, main

OVERRIDES = {"data.num-clients": 3, "data.alpha": 100.0, "seed": 0}


def test_ceilings_train_on_what_each_setting_names_and_pooled_data_helps():
    config = load_config(None, overrides=OVERRIDES)
    split = load_federation(config.data, config.seed)
    r = ceilings(config, model="mlp-small", epochs=3, lr=3e-3, batch_size=32)
    assert r["sizes"] == (np.mean([len(c.train) for c in split.clients]), float(len(split.public)))
    for key in ("local", "public-oracle", "pooled"):
        alma, global_acc = r[key]
        assert 0.0 <= alma <= 1.0 and 0.0 <= global_acc <= 1.0
    # IID digits sites: three sites' data (pooled) or the site's plus the labelled public set
    # beat one site's alone, trained for the same epochs
    assert r["pooled"][0] > r["local"][0] and r["public-oracle"][1] > r["local"][1]


def test_the_script_prints_one_row_per_alpha_and_seed(capsys):
    main(["--set", "data.num-clients=3", "--alphas", "1,100", "--seeds", "0", "--model", "mlp-small",
          "--epochs", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 1 |") or line.startswith("| 100 |")]
    assert len(rows) == 2
