"""A tabular federation from a CSV file: scikit-learn's breast cancer table (569 patients,
30 features, 2 classes) written to breast_cancer.csv, split over 4 sites (Dirichlet alpha 1), standardised with
statistics of the public set only, then run in this process.

    python examples/tabular.py            # writes breast_cancer.csv and two runs under runs/
"""

from __future__ import annotations

import sys

from sklearn.datasets import load_breast_cancer

import fedkd

table = load_breast_cancer(as_frame=True).frame  # 30 feature columns and 'target'
table.to_csv("breast_cancer.csv", index=False)

for standardize in ("none", "public"):
    config = fedkd.load_config(overrides={
        "data.dataset": "file",
        "data.path": "breast_cancer.csv",        # label column 'target' is found by name
        "data.standardize": standardize,         # fitted on the public set, never on test data
        "data.num-clients": 4,
        "data.alpha": 1.0,                       # moderate label skew: every site sees both classes
        "model.architectures": "mlp-small,mlp-large",
        "num-server-rounds": 10,                 # the default method (expert); runs/<method>-<time>/
    })
    result = fedkd.simulate(config, runner=sys.argv[1] if len(sys.argv) > 1 else "inprocess")
    print(f"standardize={standardize}: {result.status}, ALMA {result.metrics['alma']:.3f}, "
          f"worst {result.metrics['worst']:.3f}, global student {result.metrics['global-accuracy']:.3f} "
          f"({result.run_dir})")
