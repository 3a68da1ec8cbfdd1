"""simulations/datasets/make_classification_files.py: issue 14's second dataset, written as a
file that fedkd's own-data path reads (data.dataset = "file")."""

from __future__ import annotations

import numpy as np

from fedkd.config import load_config
from fedkd.data import load_federation
from fedkd.data.own import read_own_data
from simulations.datasets.make_classification_files import FILE_NAME, main, make_images


def test_images_are_8x8_in_unit_range_balanced_and_seeded():
    x, y = make_images(examples=200, classes=20, seed=3)
    assert x.shape == (200, 8, 8) and x.dtype == np.float32 and y.dtype == np.int64
    flat = x.reshape(200, 64)
    # min-max per feature over the rows: every feature reaches exactly 0 and 1
    assert flat.min(axis=0).tolist() == [0.0] * 64 and flat.max(axis=0).tolist() == [1.0] * 64
    assert np.bincount(y).tolist() == [10] * 20  # 200 rows, 20 balanced classes
    again, y_again = make_images(examples=200, classes=20, seed=3)
    assert np.array_equal(x, again) and np.array_equal(y, y_again)
    assert not np.array_equal(x, make_images(examples=200, classes=20, seed=4)[0])


def test_written_file_reads_through_the_own_data_path_unscaled(tmp_path):
    assert main(["--out", str(tmp_path), "--examples", "400", "--seed", "1"]) == 0
    path = tmp_path / FILE_NAME
    x, y, classes = read_own_data(str(path))
    expected_x, expected_y = make_images(examples=400, seed=1)
    # an image in [0, 1]: read as it was written (not divided by 255), 20 classes found
    assert classes == 20 and np.array_equal(x, expected_x) and np.array_equal(y, expected_y)
    config = load_config("simulations/digits.toml", overrides={
        "data.dataset": "file", "data.path": str(path), "data.standardize": "public",
        "data.num-clients": 4, "data.alpha": 1.0, "data.public-fraction": 0.15, "data.test-fraction": 0.1,
    })
    split = load_federation(config.data, 0)
    assert split.num_classes == 20 and split.input_shape == (8, 8) and len(split.public) == 60
    assert abs(float(split.public.x.mean())) < 1e-5  # standardised on the public set
