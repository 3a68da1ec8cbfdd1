"""Audit reports: ``audit.json``, ``audit.md`` and PNG plots (matplotlib, Agg).

One run (:func:`write_audit_report`, into ``<run dir>/audit/``):

* ``roc.png``: ROC of every (target, attack) on log-log axes with the diagonal
  TPR = FPR (chance), so the low-FPR region the metrics emphasise is visible;
* ``epsilon_bound.png``: the one-run epsilon lower bound of each (target, attack) beside
  the accountant's epsilon (dashed; absent without DP).

A sweep (:func:`write_sweep_report`): ``sweep.json``, ``sweep.md`` and
``leakage_vs_shielding.png`` (AUC against shielding temperature and noise),
``exposure_vs_accuracy.png`` (text: each setting's ALMA against the secret's exposure),
``leakage_vs_epsilon.png`` (AUC against DP epsilon), ``accuracy_vs_epsilon.png``,
``epsilon_bound_vs_accountant.png``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedkd.audit.metrics import roc_points
from fedkd.audit.one_run import epsilon_ceiling


def _plt():  # noqa: ANN202
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot serialise {type(value).__name__}")


def _f(value: Any, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


def _ci(pair: Sequence[float]) -> str:
    return f"[{pair[0]:.3f}, {pair[1]:.3f}]"


def target_verdict(name: str, target: Mapping[str, Any]) -> str:
    """One line per target: which attacks' AUC confidence intervals exclude chance (0.5),
    and, where the audit chose one, the strongest attack with its simultaneous interval.

    >>> target_verdict("knowledge", {"attacks": {"loss": {"auc_ci": [0.55, 0.70]}, "lira": {"auc_ci": [0.45, 0.6]}}})
    '- **knowledge**: leaks membership: loss (AUC CI excludes 0.5); no evidence from lira.'
    >>> target_verdict("model", {"skipped": "no model"})
    '- **model**: not audited (no model).'
    """
    if "skipped" in target:
        return f"- **{name}**: not audited ({target['skipped']})."
    best = ""
    if "strongest" in target:
        b = target["strongest"]
        best = (f" Strongest: {b['attack']}, AUC {b['auc']:.3f}, TPR@1%FPR {b['tpr_at_1pct']:.3f} "
                f"{_ci(b['tpr_at_1pct_ci_simultaneous'])} (interval at {b['simultaneous-confidence']:.1%}, "
                f"{b['of']} attacks).")
    above = [a for a, m in target["attacks"].items() if m["auc_ci"][0] > 0.5]
    below = [a for a, m in target["attacks"].items() if m["auc_ci"][1] < 0.5]
    none = [a for a in target["attacks"] if a not in above and a not in below]
    parts = []
    if above:
        parts.append(f"leaks membership: {', '.join(above)} (AUC CI excludes 0.5)")
    if below:
        parts.append(f"{', '.join(below)} below chance (AUC CI under 0.5: scores inverted)")
    if none:
        parts.append(f"no evidence from {', '.join(none)}" if parts else
                     f"no evidence of membership leakage: every AUC CI ({', '.join(none)}) includes 0.5")
    return f"- **{name}**: " + "; ".join(parts) + "." + best


def audit_markdown(result: Mapping[str, Any]) -> str:
    """The human-readable report of one audit."""
    p, acc = result["privacy"], result["accuracy"]
    shield = result["shield"]
    lines = [
        f"# Privacy audit of `{Path(result['run']).name}`",
        "",
        f"Target: site {result['site']}'s private training examples: {result['candidates']} "
        f"candidates ({result['canary-labels']} labels), {result['members']} of them trained on "
        "(each with probability 1/2, seeded). "
        f"Reference models (LiRA, RMIA): {result['reference-models']}. Released knowledge recorded for "
        f"{result['rounds-released']} rounds.",
        "",
        f"Protection: DP {'on, accountant epsilon ' + _f(p['epsilon'], '.2f') + ' (delta ' + _f(p['delta'], '.2g') + ')' if p['enabled'] else 'off'}; "
        f"shielding T0 = {shield['temperature']:g}, gamma = {shield['gamma']:g}, "
        f"noise std = {shield['noise_std']:g}, scorer {shield['scorer']}, top-k {shield['top_k']}; "
        f"release mechanism {_release_cell(shield)}.",
        "",
        f"Accuracy: ALMA {_f(acc['alma'])}, audited site {_f(acc['site'])}, "
        f"global student {_f(acc['global'])}.",
        "",
        "## Membership inference",
        "",
        "| target | threat model | attack | AUC [95% CI] | TPR@1%FPR [CI] | TPR@0.1%FPR | advantage [CI] | one-run ε lower bound |",
        "|---|---|---|---|---|---|---|---|",
    ]
    non_members = result["candidates"] - result["members"]
    for name, target in result["targets"].items():
        if "skipped" in target:
            lines.append(f"| {name} | {target['threat-model']} | - | skipped: {target['skipped']} | | | | |")
            continue
        for attack, m in target["attacks"].items():
            bound = m["one-run"]
            low_fpr = f"{m['tpr_at_01pct']:.3f}" if non_members >= 1000 else ""  # 0.1% unresolvable
            lines.append(
                f"| {name} | {target['threat-model']} | {attack} | {m['auc']:.3f} {_ci(m['auc_ci'])} | "
                f"{m['tpr_at_1pct']:.3f} {_ci(m['tpr_at_1pct_ci'])} | {low_fpr} | "
                f"{m['advantage']:.3f} {_ci(m['advantage_ci'])} | "
                + (f"{bound['epsilon_lower_bound']:.2f} ({bound['correct']}/{bound['guesses']} guesses right) |"
                   if bound else "- (guesses use known membership) |")
            )
        if "strongest" in target:
            b = target["strongest"]
            lines.append(
                f"| **{name}** | **strongest of {b['of']}** | **{b['attack']}** | **{b['auc']:.3f}** "
                f"{_ci(b['auc_ci_simultaneous'])} | **{b['tpr_at_1pct']:.3f}** "
                f"{_ci(b['tpr_at_1pct_ci_simultaneous'])} "
                f"| | | (intervals at {b['simultaneous-confidence']:.2%}) |"
            )
    lines += ["", *(target_verdict(name, target) for name, target in result["targets"].items())]
    if "strongest-rule" in result:
        lines += [
            "",
            f"**Strongest attack per target**: {result['strongest-rule']}. Picking the maximum over "
            "several attacks is optimistic (at chance level the best of k attacks still looks "
            "better than each); the bold rows therefore give the winner's intervals at the "
            "Bonferroni level 1 - 0.05/k, which hold whichever attack wins. The trained attacks "
            f"(`trained-*`) assume an attacker who knows the membership of the other "
            f"{result.get('attack-folds', 2) - 1} of {result.get('attack-folds', 2)} folds of candidates; "
            "LOSS, LiRA and RMIA know no membership. RMIA's population: "
            f"{result.get('population', '-')} examples of the global test split.",
        ]
    lb = result["epsilon-lower-bound"]
    lines += [
        "",
        "The accountant's epsilon is a proven upper bound on what any attack can learn; the "
        "audit's epsilon is an empirical lower bound (what these attacks showed): a sound "
        "system has lower bound <= upper bound.",
        "",
        f"Largest one-run epsilon lower bound: {lb['max']:.2f} ({lb['where']}), each at "
        f"confidence {result['targets'] and _first_confidence(result)} on its own; accountant's epsilon: "
        f"{_f(p['epsilon'], '.2f') if p['enabled'] else 'none (no DP)'}."
        + (" **The bound exceeds the accountant's epsilon: a bug in DP training or accounting.**"
           if p["enabled"] and lb["max"] > p["epsilon"] else ""),
        "",
        "With fewer than 100 (1,000) non-members an FPR of 1% (0.1%) cannot be resolved; read "
        "TPR at low FPR with the member counts above in mind (an unresolvable TPR is left blank).",
    ]
    ceiling = audit_ceiling(result)
    if ceiling is not None:
        lines += [
            "",
            f"Audit ceiling: with {result['candidates']} canaries (delta "
            f"{_f(_first_bound(result)['delta'], '.2g')}) the largest epsilon this audit "
            f"could certify, every guess right, is {ceiling:.2f}"
            + (f"; the accountant's {p['epsilon']:.2f} is above it, so no attack here could reach it."
               if p["enabled"] and p["epsilon"] is not None and p["epsilon"] > ceiling else "."),
        ]
    if "exposure" in result:
        e = result["exposure"]
        lines += [
            "",
            "## Canary exposure (Secret Sharer)",
            "",
            f"Secret format '{e['format']}' (label {e['label']}), inserted {e['repeats']} times; "
            f"ranked among {e['candidates']} of |R| = {e['space']} fillings. Exposure = "
            f"log2|R| - log2 rank (max {math.log2(e['space']):.1f} bits); the control is a filling "
            "that was never inserted.",
            "",
            "| model | secret exposure (rank) | secret (skew-normal) | control (rank) | control (skew-normal) |",
            "|---|---|---|---|---|",
        ]
        for name, t in e["targets"].items():
            lines.append(f"| {name} | {_exposure_cell(t['secret'])} | {_f(t['secret']['skewnorm'], '.2f')} | "
                         f"{_exposure_cell(t['control'])} | {_f(t['control']['skewnorm'], '.2f')} |")
        if any(t["secret"].get("draws", 1) > 1 for t in e["targets"].values()):
            lines += ["", "Through a random release: the mean over the draws [5%, 95% of draws]; "
                      "`release-on-probes-all-rounds` sums every round's release."]
    lines += ["", f"Audit time: {result['seconds']:.1f} s.", ""]
    return "\n".join(lines)


def _exposure_cell(entry: Mapping[str, Any]) -> str:
    """``3.12`` or, averaged over draws of a random release, ``1.90 [0.82, 3.95]``."""
    if entry.get("draws", 1) > 1:
        return f"{entry['rank']:.2f} [{entry['rank-q05']:.2f}, {entry['rank-q95']:.2f}]"
    return f"{entry['rank']:.2f}"


def _first_bound(result: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The first attack's one-run bound (canaries, delta and confidence are the audit's own);
    None when no attack made one (trained attacks make none)."""
    for target in result["targets"].values():
        for m in target.get("attacks", {}).values():
            if m["one-run"] is not None:
                return m["one-run"]
    return None


def _first_confidence(result: Mapping[str, Any]) -> str:
    bound = _first_bound(result)
    return "-" if bound is None else f"{bound['confidence']:.0%}"


def plot_roc(path: Path, scores: Mapping[str, np.ndarray], title: str) -> Path:
    plt = _plt()
    labels = scores["labels"]
    fig, ax = plt.subplots(figsize=(8.5, 5))
    negatives = max(1, int((labels == 0).sum()))
    floor = 1.0 / negatives
    for name, s in scores.items():
        if name == "labels":
            continue
        fpr, tpr = roc_points(scores=s, labels=labels)
        auc = float(np.trapezoid(tpr, fpr))
        ax.plot(np.maximum(fpr, floor / 2), np.maximum(tpr, floor / 2), label=f"{name} (AUC {auc:.3f})",
                linewidth=1.2)
    grid = np.logspace(math.log10(floor / 2), 0, 50)
    ax.plot(grid, grid, color="black", linestyle="--", linewidth=1, label="chance (TPR = FPR)")
    ax.axvline(floor, color="grey", linestyle=":", linewidth=1,
               label=f"FPR floor 1/{negatives} (no lower FPR is resolvable)")
    ax.set(xscale="log", yscale="log", xlabel="false positive rate", ylabel="true positive rate",
           xlim=(floor / 2, 1), ylim=(floor / 2, 1.05), title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def audit_ceiling(result: Mapping[str, Any]) -> float | None:
    """The largest one-run epsilon this audit could certify (:func:`epsilon_ceiling` for its
    canary count, delta and confidence); None when no target was attacked."""
    one = _first_bound(result)
    if one is None:
        return None
    return epsilon_ceiling(m=one["canaries"], delta=one["delta"], confidence=one["confidence"])


def plot_bounds(path: Path, result: Mapping[str, Any]) -> Path:
    plt = _plt()
    names, values = [], []
    for target, t in result["targets"].items():
        for attack, m in t.get("attacks", {}).items():
            if m["one-run"] is None:
                continue
            names.append(f"{target}\n{attack}")
            values.append(m["one-run"]["epsilon_lower_bound"])
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(names) + 2) + 4, 4))
    ax.bar(range(len(names)), values, color="tab:blue", label="one-run ε lower bound (95%)")
    eps = result["privacy"]["epsilon"]
    if eps is not None:
        ax.axhline(eps, color="black", linestyle="--", label=f"accountant ε = {eps:.2f} (proven upper bound)")
    ceiling = audit_ceiling(result)
    if ceiling is not None:
        ax.axhline(ceiling, color="tab:red", linestyle=":",
                   label=f"audit ceiling ε = {ceiling:.2f} (the most {result['candidates']} canaries can show)")
    ax.set_xticks(range(len(names)), names, fontsize=6)
    ax.set_ylim(bottom=0)
    ax.set(ylabel="ε", title=f"Empirical ε lower bound vs the accountant, site {result['site']}")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_audit_report(out_dir: str | Path, result: Mapping[str, Any],
                       scores: Mapping[str, np.ndarray]) -> list[Path]:
    """``audit.json``, ``audit.md``, ``audit_scores.npz``, ``roc.png``, ``epsilon_bound.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "audit.json", out / "audit.md", out / "audit_scores.npz"]
    written[0].write_text(json.dumps(result, indent=2, default=_json_default))
    written[1].write_text(audit_markdown(result))
    np.savez(written[2], **{k.replace("/", "__"): v for k, v in scores.items()})
    if len(scores) > 1:
        written.append(plot_roc(out / "roc.png", scores, f"Membership inference, site {result['site']}"))
    written.append(plot_bounds(out / "epsilon_bound.png", result))
    return written


# ------------------------------------------------------------------ sweeps


def _metric(row: Mapping[str, Any], target: str, attack: str, key: str = "auc") -> float | None:
    return row["audit"]["targets"].get(target, {}).get("attacks", {}).get(attack, {}).get(key)


def _strongest(row: Mapping[str, Any], target: str, key: str) -> str:
    best = row["audit"]["targets"].get(target, {}).get("strongest")
    return f"{_f(best[key])} {best['attack']}" if best else "-"


def _pair(row: Mapping[str, Any], target: str, key: str) -> str:
    return (f"{_f(_metric(row, target, 'loss', key))} / {_f(_metric(row, target, 'lira-online', key))} / "
            f"{_strongest(row, target, key)}")


def _release_cell(shield: Mapping[str, Any]) -> str:
    """The release mechanism of a run: ``-``, e.g. ``label-rr ε1`` (per label and round), with
    `` on pii rows`` where ``shield.release-rows`` chose them; ``withhold pii rows``."""
    release = shield.get("release", "none")
    if release == "none":
        return "-"
    rows = " on pii rows" if shield.get("release_rows", "all") == "pii" else ""
    if release == "withhold":
        return "withhold pii rows"
    return f"{release} ε{shield['release_epsilon']:g}{rows}"


def sweep_markdown(rows: Sequence[Mapping[str, Any]], command: str) -> str:
    lines = [
        "# Privacy-leakage sweep", "", f"Command: `{command}`", "",
        "Each cell: LOSS attack / LiRA online (each fixed in advance) / the strongest attack on "
        "that target and its name (chosen by the highest TPR@1%FPR lower bound: a maximum over "
        "attacks, biased upwards at chance level; each run's audit.md gives its Bonferroni "
        "intervals). Global student and site student (a DP site's public-set student): LOSS / strongest. ε LB: largest one-run lower "
        "bound over targets and attacks (each valid at 95% on its own). Accuracy: ALMA, the "
        "audited site's local test accuracy, the global student's.", "",
        "| setting | shield T0 | noise | release | DP ε (accountant) | released knowledge AUC | TPR@1%FPR | site model AUC | TPR@1%FPR | site student AUC | global student AUC | ε LB | ALMA | site acc | global acc |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        a = row["audit"]
        p, acc = a["privacy"], a["accuracy"]
        lines.append(
            f"| {row['setting']} | {a['shield']['temperature']:g} | {a['shield']['noise_std']:g} | "
            f"{_release_cell(a['shield'])} | {_f(p['epsilon'], '.2f') if p['enabled'] else 'off'} | "
            f"{_pair(row, 'released-knowledge', 'auc')} | {_pair(row, 'released-knowledge', 'tpr_at_1pct')} | "
            f"{_pair(row, 'site-model', 'auc')} | {_pair(row, 'site-model', 'tpr_at_1pct')} | "
            f"{_f(_metric(row, 'site-student', 'loss'))} / {_strongest(row, 'site-student', 'auc')} | "
            f"{_f(_metric(row, 'global-student', 'loss'))} / {_strongest(row, 'global-student', 'auc')} | "
            f"{a['epsilon-lower-bound']['max']:.2f} | "
            f"{_f(acc['alma'])} | {_f(acc['site'])} | {_f(acc['global'])} |"
        )
    exposure_rows = [r for r in rows if "exposure" in r["audit"]]
    if exposure_rows:
        names = sorted({n for r in exposure_rows for n in r["audit"]["exposure"]["targets"]})
        lines += ["", "## Canary exposure (bits, rank among random fillings; skew-normal in brackets)", "",
                  "| setting | " + " | ".join(names) + " | control (site model) |",
                  "|---|" + "---|" * (len(names) + 1)]
        for r in exposure_rows:
            t = r["audit"]["exposure"]["targets"]
            cells = [f"{t[n]['secret']['rank']:.2f} ({_f(t[n]['secret']['skewnorm'], '.1f')})" if n in t else "-"
                     for n in names]
            control = t.get("site-model", {}).get("control", {}).get("rank")
            lines.append(f"| {r['setting']} | " + " | ".join(cells) + f" | {_f(control, '.2f')} |")
    lines.append("")
    return "\n".join(lines)


def _probe_exposure(row: Mapping[str, Any]) -> float | None:
    """The secret's exposure through the release on probes (bits, by rank) of a sweep row."""
    target = (row["audit"].get("exposure") or {}).get("targets", {}).get("release-on-probes")
    return None if target is None else target["secret"]["rank"]


def _exposure_plot(plt: Any, out: Path, rows: Sequence[Mapping[str, Any]]) -> list[Path]:  # noqa: ANN401
    """``exposure_vs_accuracy.png`` (text sweeps with a secret): each setting's ALMA against
    the secret's exposure through the release on probes, with the level 80% below the
    unprotected setting's exposure (issue 15's target) when a ``none`` setting ran."""
    pts = [(r["audit"]["accuracy"]["alma"], _probe_exposure(r), r["setting"]) for r in rows]
    pts = [p for p in pts if p[0] is not None and p[1] is not None]
    if not pts:
        return []
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.scatter([p[0] for p in pts], [p[1] for p in pts])
    for alma, bits, name in pts:
        ax.annotate(name, (alma, bits), textcoords="offset points", xytext=(4, 4), fontsize=8)
    base = [p for p in pts if p[2] == "none"]
    if base:
        ax.axhline(0.2 * base[0][1], color="black", linestyle=":", linewidth=1, label="80% below no protection")
        ax.axvline(base[0][0] - 0.01, color="grey", linestyle="--", linewidth=1, label="1 point of ALMA below it")
        ax.legend(fontsize=8)
    ax.set(xlabel="ALMA", ylabel="secret exposure via release on probes (bits)", ylim=(0, None),
           title="Canary exposure against accuracy")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "exposure_vs_accuracy.png", dpi=110)
    plt.close(fig)
    return [out / "exposure_vs_accuracy.png"]


def write_sweep_report(out_dir: str | Path, rows: Sequence[Mapping[str, Any]], *, command: str) -> list[Path]:
    """``sweep.json``, ``sweep.md`` and the trade-off plots (module doc)."""
    plt = _plt()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "sweep.json", out / "sweep.md"]
    written[0].write_text(json.dumps({"command": command, "rows": list(rows)}, indent=2, default=_json_default))
    written[1].write_text(sweep_markdown(rows, command))
    targets = ("released-knowledge", "site-model", "global-student")

    def plot(name: str, kind: str, xkey, xlabel: str, ykey, ylabel: str, log: bool = False) -> None:  # noqa: ANN001
        chosen = [r for r in rows if r["kind"] in kind]
        if not chosen:
            return
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, fn in ykey:
            pts = sorted((xkey(r), fn(r)) for r in chosen if fn(r) is not None and xkey(r) is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set(xlabel=xlabel, ylabel=ylabel)
        if log:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(out / name)

    auc_lines = [(f"{t} (LOSS)", (lambda r, t=t: _metric(r, t, "loss"))) for t in targets] + [
        (f"{t} (LiRA online)", (lambda r, t=t: _metric(r, t, "lira-online"))) for t in targets[:2]]
    fig_rows = [r for r in rows if r["kind"] in ("none", "temperature", "noise")]
    if fig_rows:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, kind, key, label in ((axes[0], "temperature", "temperature", "shielding temperature T0"),
                                     (axes[1], "noise", "noise_std", "shielding logit noise std")):
            chosen = [r for r in fig_rows if r["kind"] in ("none", kind)]
            for t, fn in auc_lines:
                pts = sorted((r["audit"]["shield"][key], fn(r)) for r in chosen if fn(r) is not None)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=t)
            ax.axhline(0.5, color="black", linestyle=":", linewidth=1)
            ax.set(xlabel=label, ylabel="attack AUC", ylim=(0.3, 1.02))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle("Leakage against shielding")
        fig.tight_layout()
        fig.savefig(out / "leakage_vs_shielding.png", dpi=110)
        plt.close(fig)
        written.append(out / "leakage_vs_shielding.png")
    eps_of = lambda r: r["audit"]["privacy"]["epsilon"]  # noqa: E731
    plot("leakage_vs_epsilon.png", ("dp",), eps_of, "accountant ε (site)", auc_lines,
         "attack AUC", log=True)
    plot("accuracy_vs_epsilon.png", ("dp",), eps_of, "accountant ε (site)",
         [("ALMA", lambda r: r["audit"]["accuracy"]["alma"]),
          ("audited site", lambda r: r["audit"]["accuracy"]["site"]),
          ("global student", lambda r: r["audit"]["accuracy"]["global"])], "accuracy", log=True)
    written += _exposure_plot(plt, out, rows)
    dp_rows = [r for r in rows if r["audit"]["privacy"]["enabled"]]
    if dp_rows:
        fig, ax = plt.subplots(figsize=(5, 4.5))
        xs = [r["audit"]["privacy"]["epsilon"] for r in dp_rows]
        ys = [r["audit"]["epsilon-lower-bound"]["max"] for r in dp_rows]
        ax.scatter(xs, ys, label="one-run lower bound (largest, 95%)")
        top = max(xs + ys) * 1.1
        ax.plot([0, top], [0, top], color="black", linestyle="--", linewidth=1, label="bound = accountant ε")
        ax.set(xlabel="accountant ε", ylabel="empirical ε lower bound", xlim=(0, top), ylim=(0, top),
               title="One-run ε lower bound vs the accountant")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "epsilon_bound_vs_accountant.png", dpi=110)
        plt.close(fig)
        written.append(out / "epsilon_bound_vs_accountant.png")
    return written
