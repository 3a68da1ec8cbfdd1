"""fedkd.audit.sweep: the trade-off sweep's settings and each setting's configuration."""

from __future__ import annotations

import dataclasses

import pytest

from fedkd.audit.report import sweep_markdown
from fedkd.audit.sweep import SWEEP_KINDS, setting_config, sweep_settings
from fedkd.config import load_config


def _settings(kinds=SWEEP_KINDS):
    return sweep_settings(temperatures=[4, 16], noises=[1], epsilons=[1, 4, 16], release_epsilons=[1, 4],
                          kinds=kinds)


def test_every_kind_in_a_fixed_order_with_its_parameters():
    names = [s.name for s in _settings()]
    assert names == ["none", "shield-T4", "shield-T16", "shield-noise1", "shield-T4-noise1", "dp-eps1",
                     "dp-eps4", "dp-eps16", "both-T4-noise1-eps4", "release-rr1", "release-rr4",
                     "dp-eps4-rr1", "withhold-pii", "redact-pii"]
    by_name = {s.name: s for s in _settings()}
    assert by_name["release-rr4"].release_epsilon == 4 and by_name["release-rr4"].epsilon is None
    # DP at the middle epsilon (4) with the first release epsilon (1)
    assert (by_name["dp-eps4-rr1"].epsilon, by_name["dp-eps4-rr1"].release_epsilon) == (4, 1)
    assert by_name["both-T4-noise1-eps4"].release_epsilon is None


def test_release_kinds_need_release_epsilons_and_unknown_kinds_are_refused():
    assert sweep_settings(temperatures=[], noises=[], epsilons=[4], kinds=["release", "dp-release"]) == []
    with pytest.raises(ValueError, match="unknown sweep setting.*bogus.*choose from"):
        sweep_settings(temperatures=[], noises=[], epsilons=[], kinds=["bogus"])


def test_setting_config_turns_on_exactly_the_settings_protection():
    base = load_config(None, overrides={"shield.release": "label-rr", "shield.release-epsilon": 9.0})
    by_name = {s.name: s for s in _settings()}
    plain = setting_config(base, by_name["none"], sweep_name="s")
    assert plain.shield.release == "none" and not plain.privacy.enabled and plain.audit.enabled
    assert plain.run_name == "s/none"
    rr = setting_config(base, by_name["release-rr4"], sweep_name="s")
    assert (rr.shield.release, rr.shield.release_epsilon, rr.privacy.enabled) == ("label-rr", 4, False)
    both = setting_config(base, by_name["dp-eps4-rr1"], sweep_name="s")
    assert (both.shield.release, both.shield.release_epsilon) == ("label-rr", 1)
    assert both.privacy.enabled and both.privacy.target_epsilon == 4
    # everything but shield.*, privacy.*, train.mode, audit and the run name is the base's
    for field in ("data", "model", "fusion", "knowledge", "seed"):
        assert getattr(rr, field) == getattr(base, field)


def test_the_sweep_table_names_the_release_mechanism():
    base = load_config(None)

    def row(setting, release, eps):
        shield = {**dataclasses.asdict(base.shield), "release": release, "release_epsilon": eps}
        audit = {"shield": shield, "privacy": {"enabled": False, "epsilon": None},
                 "accuracy": {"alma": 0.9, "site": 0.8, "global": 0.7}, "targets": {},
                 "epsilon-lower-bound": {"max": 0.0}}
        return {"setting": setting, "kind": "x", "audit": audit}

    table = sweep_markdown([row("none", "none", 1.0), row("release-rr2", "label-rr", 2.0)], command="c")
    lines = [line for line in table.splitlines() if line.startswith("| none") or line.startswith("| release")]
    assert lines[0].split(" | ")[3] == "-"
    assert lines[1].split(" | ")[3] == "label-rr ε2"
    pii = row("release-rr1", "label-rr", 1.0)
    pii["audit"]["shield"]["release_rows"] = "pii"
    held = row("withhold-pii", "withhold", 2.0)
    held["audit"]["shield"]["release_rows"] = "pii"
    table = sweep_markdown([pii, held], command="c")
    cells = [line.split(" | ")[3] for line in table.splitlines() if line.startswith(("| release", "| withhold"))]
    assert cells == ["label-rr ε1 on pii rows", "withhold pii rows"]


def test_withhold_setting_withholds_pii_rows_and_the_others_keep_or_reset_the_rows():
    """--set shield.release=label-rr --set shield.release-rows=pii on a text base: the label-rr
    settings randomize the pii rows only, the withhold setting withholds them, the settings
    without a release mechanism go back to all rows (pii rows without a mechanism are refused)."""
    text = {"data.dataset": "topics", "model.architectures": "bert-tiny", "global-student.model": "bert-tiny"}
    base = load_config(None, overrides={**text, "shield.release": "label-rr", "shield.release-rows": "pii"})
    by_name = {s.name: s for s in _settings()}
    held = setting_config(base, by_name["withhold-pii"], sweep_name="s")
    assert (held.shield.release, held.shield.release_rows, held.privacy.enabled) == ("withhold", "pii", False)
    assert held.fusion.release_debias == "off" and held.run_name == "s/withhold-pii"
    rr = setting_config(base, by_name["release-rr1"], sweep_name="s")
    assert (rr.shield.release, rr.shield.release_rows, rr.shield.release_epsilon) == ("label-rr", "pii", 1)
    for name in ("none", "dp-eps4", "shield-T4"):
        cfg = setting_config(base, by_name[name], sweep_name="s")
        assert (cfg.shield.release, cfg.shield.release_rows) == ("none", "all")
        assert cfg.data.public_redact == "none"
    red = setting_config(base, by_name["redact-pii"], sweep_name="s")
    assert (red.data.public_redact, red.shield.release, red.privacy.enabled) == ("pii", "none", False)
    assert red.data.dataset == "topics" and red.run_name == "s/redact-pii"


def test_release_debias_applies_to_the_release_settings_only():
    """--set shield.release=label-rr --set fusion.release-debias=rounds: the release settings keep
    the debias; the settings without a release turn it off (it would be refused there)."""
    base = load_config(None, overrides={"shield.release": "label-rr", "fusion.release-debias": "rounds"})
    by_name = {s.name: s for s in _settings()}
    assert setting_config(base, by_name["none"], sweep_name="s").fusion.release_debias == "off"
    assert setting_config(base, by_name["dp-eps1"], sweep_name="s").fusion.release_debias == "off"
    assert setting_config(base, by_name["release-rr1"], sweep_name="s").fusion.release_debias == "rounds"
    assert setting_config(base, by_name["dp-eps4-rr1"], sweep_name="s").fusion.release_debias == "rounds"


def test_sweep_report_plots_exposure_against_accuracy_when_a_secret_was_audited(tmp_path):
    from fedkd.audit.report import _probe_exposure, write_sweep_report

    def row(setting, alma, bits):
        audit = {"shield": {"release": "none", "temperature": 1.0, "noise_std": 0.0},
                 "privacy": {"enabled": False, "epsilon": None},
                 "accuracy": {"alma": alma, "site": 0.8, "global": 0.7}, "targets": {},
                 "epsilon-lower-bound": {"max": 0.0}}
        if bits is not None:
            entry = {"rank": bits, "skewnorm": bits}
            audit["exposure"] = {"targets": {"release-on-probes": {"secret": entry, "control": entry}}}
        return {"setting": setting, "kind": "none" if setting == "none" else "withhold", "audit": audit}

    rows = [row("none", 0.83, 9.4), row("withhold-pii", 0.82, 1.0)]
    assert _probe_exposure(rows[1]) == 1.0 and _probe_exposure(row("x", 0.5, None)) is None
    written = write_sweep_report(tmp_path / "a", rows, command="c")
    assert (tmp_path / "a" / "exposure_vs_accuracy.png") in written
    assert (tmp_path / "a" / "exposure_vs_accuracy.png").stat().st_size > 0
    written = write_sweep_report(tmp_path / "b", [row("none", 0.83, None)], command="c")
    assert not (tmp_path / "b" / "exposure_vs_accuracy.png").exists()
