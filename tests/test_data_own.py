"""fedkd/data/own.py: your own data (CSV, x/y .npz, save_to_disk folders), image scaling,
standardisation fitted on public or private data only; data.path refusals; no split cache."""

from __future__ import annotations

import numpy as np
import pytest

from fedkd.config import ConfigError, load_config
from fedkd.data import DataUnavailableError, load_federation, load_source, site_view, split_cache_path
from fedkd.data.own import encode_labels, read_own_data, scale_features, standardize_split
from fedkd.data.splits import ArrayDataset, ClientData, FederatedSplit


def test_csv_label_column_is_found_and_string_labels_numbered(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("a,species,b\n1.5,setosa,2\n3,virginica,4\n5,setosa,6\n")
    # no label/target/class/y column: the last column ('b') is the label, a and species features
    with pytest.raises(Exception, match="column 'species' is not numeric"):
        read_own_data(str(path), label_column="")  # 'b' picked as label -> species is a feature
    x, y, k = read_own_data(str(path), label_column="species")
    assert y.tolist() == [0, 1, 0] and k == 2
    assert x.tolist() == [[1.5, 2.0], [3.0, 4.0], [5.0, 6.0]]  # tabular: not divided by 255
    x, y, k = read_own_data(str(path), label_column="species", feature_columns="b")
    assert x.tolist() == [[2.0], [4.0], [6.0]]


def test_csv_target_column_detected(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("target,f1\n2,10\n0,20\n")
    x, y, k = read_own_data(str(path))
    assert y.tolist() == [2, 0] and k == 3 and x.tolist() == [[10.0], [20.0]]


def test_npz_x_y_and_image_scaling(tmp_path):
    np.savez(tmp_path / "img.npz", x=np.full((4, 2, 2), 255, np.uint8), y=np.array([0, 1, 0, 1]))
    x, y, k = read_own_data(str(tmp_path / "img.npz"))
    assert x.dtype == np.float32 and float(x.max()) == 1.0 and k == 2
    np.savez(tmp_path / "tab.npz", x=np.array([[300.0, -2.0]]), y=np.array([0]))
    assert read_own_data(str(tmp_path / "tab.npz"))[0].tolist() == [[300.0, -2.0]]
    assert scale_features(np.array([[[0.5]]])).tolist() == [[[0.5]]]  # an image already in [0, 1]


def test_save_to_disk_folder_with_named_columns(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"age": [30, 40, 50], "income": [1.0, 2.0, 3.0], "ok": ["y", "n", "y"]})
    ds.save_to_disk(str(tmp_path / "folder"))
    x, y, k = read_own_data(str(tmp_path / "folder"), label_column="ok")
    assert x.tolist() == [[30.0, 1.0], [40.0, 2.0], [50.0, 3.0]] and y.tolist() == [1, 0, 1] and k == 2
    x, _, _ = read_own_data(str(tmp_path / "folder"), label_column="ok", feature_columns="income")
    assert x.tolist() == [[1.0], [2.0], [3.0]]


def test_encode_labels():
    assert encode_labels(np.array([3, 1]))[1] == 4
    assert encode_labels(np.array([-1, 1]))[0].tolist() == [0, 1]


def _tiny_split() -> FederatedSplit:
    def part(values):  # noqa: ANN001, ANN202
        x = np.asarray(values, np.float32).reshape(-1, 1)
        return ArrayDataset(x, np.zeros(len(x), np.int64), np.arange(len(x)))

    client = ClientData(train=part([2.0, 4.0]), val=part([100.0]), test=part([1000.0]))
    return FederatedSplit(public=part([0.0, 2.0]), test=part([-500.0]), clients=(client,), num_classes=2,
                          input_shape=(1,))


def test_standardize_fits_on_public_or_private_never_test():
    public = standardize_split(_tiny_split(), fit_on="public")  # mean 1, std 1
    assert public.public.x.ravel().tolist() == [-1.0, 1.0]
    assert public.clients[0].train.x.ravel().tolist() == [1.0, 3.0]
    assert public.test.x.ravel().tolist() == [-501.0]
    private = standardize_split(_tiny_split(), fit_on="private")  # train [2, 4]: mean 3, std 1
    assert private.clients[0].train.x.ravel().tolist() == [-1.0, 1.0]
    assert private.clients[0].test.x.ravel().tolist() == [997.0]  # test values did not move the fit


def test_standardize_a_site_view_fits_on_its_own_part_and_keeps_its_partition_id():
    split = _tiny_split()
    view = site_view(public=split.public, client=4, data=split.clients[0], num_classes=2)
    private = standardize_split(view, fit_on="private")  # site 4's train [2, 4]: mean 3, std 1
    assert list(private.clients) == [4]
    assert private.clients[4].train.x.ravel().tolist() == [-1.0, 1.0]
    assert private.public.x.ravel().tolist() == [-3.0, -1.0]
    assert private.test.x.shape == (0, 1)  # a site holds no global test set


def test_data_path_refusals_are_one_line_each():
    with pytest.raises(ConfigError) as err:
        load_config(overrides={"data.path": "wine.csv"})
    assert err.value.problems == [
        "data.path: the embedded dataset 'digits' reads no file; to train on 'wine.csv' set "
        "data.dataset = \"file\" (CSV, x/y .npz or a save_to_disk folder)"]
    with pytest.raises(ConfigError, match="data.dataset 'file' reads your own data from data.path"):
        load_config(overrides={"data.dataset": "file"})
    with pytest.raises(DataUnavailableError) as missing:  # a path that is not there: what 'file' reads, not the hub
        load_source("file", path="/no/such/wine.npz")
    assert str(missing.value) == ("data.path: no file or folder at '/no/such/wine.npz' (data.dataset 'file' reads a "
                                  ".csv file, an .npz file with arrays x and y, or a datasets.save_to_disk folder)")
    with pytest.raises(ConfigError, match="data.standardize: text data"):
        load_config(overrides={"data.dataset": "topics", "data.standardize": "public",
                               "model.architectures": "bert-tiny", "global-student.enabled": False})


def test_a_csv_federation_is_read_and_never_cached(tmp_path):
    rows = ["f1,f2,label"] + [f"{i % 7},{(i * 3) % 11},{i % 3}" for i in range(150)]
    (tmp_path / "d.csv").write_text("\n".join(rows) + "\n")
    config = load_config(overrides={"data.dataset": "file", "data.path": str(tmp_path / "d.csv"),
                                    "data.num-clients": 3, "data.partitioner": "iid"})
    assert split_cache_path(config.data, 0) is None  # a user's file can change behind any key
    split = load_federation(config.data, 0)
    assert split.input_shape == (2,) and split.num_classes == 3
    assert len(split.public) + len(split.test) + sum(len(c.train) + len(c.val) + len(c.test)
                                                    for c in split.clients) == 150
