"""Tests for fedkd.config and the CLI's handling of bad configuration (no simulation runs)."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from fedkd.config import (
    CONFIG_FIELDS,
    Config,
    ConfigError,
    build_config,
    describe_options,
    load_config,
    parse_overrides,
    parse_value,
)

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_defaults_build():
    cfg = build_config({})
    assert cfg == Config()
    assert cfg.fusion.method == "expert" and cfg.validated_targets and cfg.fusion.sends_consensus
    assert cfg.fusion.beta == 10.0
    assert cfg.fusion.threshold == "median"
    assert cfg.fusion.max_neighbours == 10
    assert cfg.fusion.era_temperature == 0.1
    assert cfg.data.dataset == "digits"
    assert load_config() == Config()


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().seed = 3  # type: ignore[misc]


def test_flat_and_nested_inputs_give_the_same_config():
    flat = {"fusion.method": "mean", "fusion.beta": 3.0, "data.alpha": 0.5, "seed": 7,
            "global-student.enabled": False}
    nested = {"fusion": {"method": "mean", "beta": 3.0}, "data": {"alpha": 0.5}, "seed": 7,
              "global-student": {"enabled": False}}
    a, b = build_config(flat), build_config(nested)
    assert a == b
    assert (a.fusion.method, a.fusion.beta, a.data.alpha, a.seed, a.global_student.enabled) == (
        "mean", 3.0, 0.5, 7, False)
    # untouched keys keep their defaults
    assert a.fusion.measure == Config().fusion.measure
    assert a.train == Config().train


def test_every_key_has_help_and_appears_in_options():
    text = describe_options()
    flat = Config().to_flat()
    assert set(CONFIG_FIELDS) == set(flat)
    for key, field in CONFIG_FIELDS.items():
        assert field.metadata["help"]
        assert key in text


# ----------------------------------------------------------------- --set parsing


def test_parse_overrides_types():
    parsed = parse_overrides(
        ["fusion.beta=5", "global-student.enabled=false", "fusion.method=mean", "data.alpha=0.5",
         "run-name=\"2024\"", " seed = 3 "]
    )
    assert parsed == {
        "fusion.beta": 5,
        "global-student.enabled": False,
        "fusion.method": "mean",
        "data.alpha": 0.5,
        "run-name": "2024",
        "seed": 3,
    }
    assert type(parsed["fusion.beta"]) is int
    assert type(parsed["fusion.method"]) is str
    cfg = build_config(parsed)
    assert cfg.fusion.beta == 5.0 and type(cfg.fusion.beta) is float
    assert cfg.global_student.enabled is False
    assert cfg.run_name == "2024"


@pytest.mark.parametrize(
    "text, expected",
    [("5", 5), ("5.0", 5.0), ("false", False), ("true", True), ("mean", "mean"), ("'q'", "q"),
     ("a b", "a b"), ("/tmp/data", "/tmp/data")],
)
def test_parse_value(text, expected):
    value = parse_value(text)
    assert value == expected and type(value) is type(expected)


def test_parse_overrides_rejects_pairs_without_equals():
    with pytest.raises(ConfigError) as err:
        parse_overrides(["fusion.method", "=3", "seed=1"])
    assert len(err.value.problems) == 2
    assert "fusion.method" in err.value.problems[0] and "key=value" in err.value.problems[0]


def test_int_field_accepts_integral_float_and_string_bool():
    cfg = build_config({"seed": 4.0, "global-student.enabled": "TRUE"})
    assert cfg.seed == 4 and type(cfg.seed) is int
    assert cfg.global_student.enabled is True


# ----------------------------------------------------------------- errors


def test_unknown_key_suggests_close_match():
    with pytest.raises(ConfigError) as err:
        build_config({"fusion.metod": "mean"})
    assert err.value.problems == ["fusion.metod: unknown key; did you mean 'fusion.method'?"]
    with pytest.raises(ConfigError, match="did you mean 'num-server-rounds'"):
        build_config({"num_server_rounds": 3})


def test_unknown_key_without_close_match_has_no_hint():
    with pytest.raises(ConfigError) as err:
        build_config({"zzzzzz": 1})
    assert err.value.problems == ["zzzzzz: unknown key"]


def test_one_error_lists_every_problem():
    with pytest.raises(ConfigError) as err:
        build_config(
            {"fusion.metod": "mean", "data.alpha": -1, "fusion.method": "bogus", "seed": "x",
             "train.batch-size": 0}
        )
    problems = err.value.problems
    assert len(problems) == 5
    keys = [p.split(":")[0] for p in problems]
    assert keys == ["fusion.metod", "data.alpha", "fusion.method", "seed", "train.batch-size"]
    message = str(err.value)
    for p in problems:
        assert p in message


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("fusion.method", "bogus", ["fusion.method", "era, expert, knfu, mean, none", "'bogus'"]),
        ("fusion.measure", "cosine", ["fusion.measure", "epd", "agreement", "'cosine'"]),
        ("data.partitioner", "zipf", ["data.partitioner", "dirichlet", "pathological", "iid", "'zipf'"]),
        ("shield.scorer", "loud", ["shield.scorer", "confidence", "divergence", "uniform", "'loud'"]),
        ("global-student.model", "resnet", ["global-student.model", "mlp-small", "cnn-small", "'resnet'"]),
        ("model.architectures", "mlp-small,resnet", ["model.architectures", "mlp-large", "mlp-small,resnet"]),
        ("data.alpha", 0, ["data.alpha", "> 0", "0"]),
        ("data.alpha", -1, ["data.alpha", "> 0", "-1"]),
        ("data.public-fraction", 0.95, ["data.public-fraction", "<= 0.9", "0.95"]),
        ("train.batch-size", 0, ["train.batch-size", ">= 1", "0"]),
        ("data.num-clients", 2.5, ["data.num-clients", "integer", "2.5"]),
        ("fusion.beta", "x", ["fusion.beta", "number", "'x'"]),
        ("fusion.beta", True, ["fusion.beta", "number", "True"]),
        ("fusion.beta", float("inf"), ["fusion.beta", "finite", "inf"]),
        ("global-student.enabled", "maybe", ["global-student.enabled", "true or false", "'maybe'"]),
        ("fusion.threshold", "mid", ["fusion.threshold", "'median'", "'mid'"]),
        ("fusion.threshold", -0.1, ["fusion.threshold", ">= 0", "-0.1"]),
    ],
)
def test_invalid_value_names_key_allowed_and_received(key, value, words):
    with pytest.raises(ConfigError) as err:
        build_config({key: value})
    assert len(err.value.problems) == 1
    problem = err.value.problems[0]
    assert problem.startswith(f"{key}: ")
    for word in words:
        assert word in problem, (word, problem)


def test_threshold_accepts_median_or_number():
    assert build_config({"fusion.threshold": 0.3}).fusion.threshold == 0.3
    assert build_config({"fusion.threshold": "median"}).fusion.threshold == "median"


def test_cross_check_min_clients_vs_num_clients():
    with pytest.raises(ConfigError) as err:
        build_config({"min-clients": 5, "data.num-clients": 4})
    assert err.value.problems == ["min-clients: must be <= data.num-clients (4); got 5"]
    assert build_config({"min-clients": 4, "data.num-clients": 4}).min_clients == 4
    with pytest.raises(ConfigError, match="min-clients"):
        build_config({"min-clients": 11})  # against the default of 10 clients


def test_cross_check_problems_reported_with_key_problems():
    with pytest.raises(ConfigError) as err:
        build_config({"data.alpha": -1, "min-clients": 50, "data.num-clients": 4})
    assert len(err.value.problems) == 2


def test_cross_check_fractions():
    with pytest.raises(ConfigError) as err:
        build_config({"data.public-fraction": 0.5, "data.test-fraction": 0.45,
                      "data.val-fraction": 0.4, "data.local-test-fraction": 0.4})
    assert len(err.value.problems) == 2
    assert "data.public-fraction + data.test-fraction" in err.value.problems[0]
    assert "data.val-fraction + data.local-test-fraction" in err.value.problems[1]


def test_jittered_public_copies_are_refused_for_token_ids():
    with pytest.raises(ConfigError) as err:
        build_config({"data.dataset": "topics", "data.public-copies": 2, "model.architectures": "bert-tiny",
                      "global-student.model": "bert-tiny"})
    assert err.value.problems == ["data.public-copies: text data (data.dataset 'topics') is token ids, "
                                  "which cannot be jittered; must be 0; got 2"]
    assert build_config({"data.public-copies": 2}).data.public_copies == 2


def test_public_redact_needs_text():
    with pytest.raises(ConfigError) as err:
        build_config({"data.public-redact": "pii"})
    assert err.value.problems == ["data.public-redact: 'pii' rewrites public texts and needs a text dataset; "
                                  "got data.dataset 'digits' (use 'none')"]


def test_release_rows_need_label_rr_and_pii_rows_need_text():
    with pytest.raises(ConfigError) as err:
        build_config({"shield.release-rows": "pii"})
    assert err.value.problems == [
        "shield.release-rows: 'pii' chooses the rows a release mechanism acts on and needs shield.release = "
        "'label-rr' or 'withhold'; got shield.release = 'none'",
        "shield.release-rows: 'pii' reads the public inputs as text and needs a text dataset; "
        "got data.dataset 'digits' (use 'all')"]
    text = {"data.dataset": "topics", "model.architectures": "bert-tiny", "global-student.model": "bert-tiny",
            "shield.release": "label-rr", "shield.release-rows": "pii"}
    assert build_config(text).shield.release_rows == "pii"
    with pytest.raises(ConfigError, match="shield.release-rows: must be one of all, pii"):
        build_config({**text, "shield.release-rows": "names"})
    with pytest.raises(ConfigError) as err:
        build_config({**text, "shield.release": "withhold", "shield.release-rows": "all"})
    assert err.value.problems == [
        "shield.release: 'withhold' on every row releases nothing; set shield.release-rows = 'pii' "
        "(withhold the rows whose public text looks like personal data) or use 'label-rr'"]
    assert build_config({**text, "shield.release": "withhold", "shield.release-rows": "pii"}).shield.release == "withhold"


# ----------------------------------------------------------------- files


def test_to_toml_round_trips(tmp_path):
    cfg = build_config({"fusion.method": "era", "fusion.threshold": 0.25, "data.alpha": 0.7,
                        "global-student.enabled": False, "model.architectures": "cnn-small",
                        "run-name": "x y", "shield.top-k": 3})
    path = tmp_path / "run.toml"
    path.write_text(cfg.to_toml())
    assert load_config(path) == cfg
    assert load_config(path, overrides={"seed": 9}) == dataclasses.replace(cfg, seed=9)
    assert tomllib.loads(Config().to_toml()) == Config().to_nested()


def test_load_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("fusion = [\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    typo = tmp_path / "typo.toml"
    typo.write_text("[fusion]\nbetta = 3\n")
    with pytest.raises(ConfigError, match="fusion.betta: unknown key; did you mean 'fusion.beta'"):
        load_config(typo)


def test_overrides_win_over_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('seed = 1\n[fusion]\nmethod = "mean"\n')
    cfg = load_config(path, overrides={"fusion.method": "era"})
    assert (cfg.seed, cfg.fusion.method) == (1, "era")


def test_pyproject_flower_config_equals_defaults():
    table = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    assert table == Config().to_nested()
    assert build_config(table) == Config()


def test_architecture_for_assigns_in_turn():
    cfg = build_config({"model.architectures": "mlp-small, cnn-small"})
    assert [cfg.architecture_for(i) for i in range(4)] == ["mlp-small", "cnn-small", "mlp-small", "cnn-small"]


def test_numeric_set_value_for_a_name_key_becomes_a_string():
    assert load_config(overrides=parse_overrides(["run-name=2024"])).run_name == "2024"
    with pytest.raises(ConfigError, match="fusion.method"):
        load_config(overrides={"fusion.method": 3})  # a choice key still refuses numbers


def test_auto_site_policy_follows_the_method():
    """'auto': the default method (expert) validates its targets and sends the consensus; the
    baselines stay the published algorithms (distil F_i, no consensus) unless asked."""
    for method in ("none", "mean", "era", "knfu"):
        cfg = build_config({"fusion.method": method})
        assert not cfg.validated_targets and not cfg.fusion.sends_consensus
    forced = build_config({"fusion.method": "mean", "train.target-choice": "validated", "fusion.consensus": "on"})
    assert forced.validated_targets and forced.fusion.sends_consensus
    off = build_config({"train.target-choice": "fused", "fusion.consensus": "off"})
    assert not off.validated_targets and not off.fusion.sends_consensus
def test_infinite_threshold_and_huge_seed_are_refused():
    from fedkd.config import ConfigError, load_config

    for overrides, message in (({"fusion.threshold": float("inf")}, "fusion.threshold: must be 'median' or a finite"),
                               ({"seed": 1e30}, "seed: must be an integer; got 1e+30"),
                               ({"seed": 2**40}, "seed: must be <= 4294967295"),
                               ({"privacy.noise-seed": "seeded"}, "privacy.noise-seed: must be one of auto, run-seed")):
        try:
            load_config(overrides=overrides)
        except ConfigError as err:
            assert any(p.startswith(message) for p in err.problems), err.problems
        else:
            raise AssertionError(f"{overrides} accepted")
    assert load_config(overrides={"seed": 3.0, "fusion.threshold": 0.5}).seed == 3


def test_fusion_trust_accepts_claimed_and_names_the_choices():
    from fedkd.config import ConfigError, load_config

    assert load_config(overrides={"fusion.trust": "claimed"}).fusion.trust == "claimed"
    try:
        load_config(overrides={"fusion.trust": "eigen"})
    except ConfigError as err:
        assert "fusion.trust: must be one of verified, claimed, off; got 'eigen'" in err.problems, err.problems
    else:
        raise AssertionError("fusion.trust = 'eigen' accepted")


def test_a_dp_student_needs_the_consensus_sent():
    with pytest.raises(ConfigError, match="privacy.student: 'consensus' .* needs it sent .* got fusion.consensus = 'auto' "
                                          "with fusion.method = 'mean'"):
        load_config(overrides={"privacy.student": "consensus", "fusion.method": "mean"})
    assert load_config(overrides={"privacy.student": "consensus", "fusion.method": "mean", "fusion.consensus": "on",
                                  "privacy.enabled": True}).dp_student
