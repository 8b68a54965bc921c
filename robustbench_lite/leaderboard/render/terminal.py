"""Terminal output of ``robustbench-lite evaluate``: one evaluation's accuracies, costs, flags and the
defense metrics of its record (worst-group and selective accuracy, the WRM certificate, corruption accuracy)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .tables import _pct as _pct_or_dash


def _pct(value: float) -> str:
    return f"{100 * value:6.1f}"


def format_result(result: Any, model_name: str, path: Path | None, wall: float,
                  record: dict[str, Any] | None = None) -> str:
    """The terminal table of one evaluation: accuracies, per plug-in accuracy and cost, flags, and the
    record's group accuracies and WRM certificate when it has them."""
    t = result.threat
    lines = [f"model {model_name} on {result.dataset}/{result.split} ({result.n_examples} examples), "
             f"{t.norm} eps={t.eps:g}, seed {result.seed}, {result.mode} attacks",
             f"  {'':<22}{'acc %':>7}{'seconds':>10}{'fwd':>10}{'bwd':>10}{'queries':>9}",
             f"  {'clean':<22}{_pct(result.clean_acc):>7}"]
    for r in result.attacks:
        lines.append(f"  {'attack ' + r.name:<22}{_pct(r.accuracy):>7}{r.seconds:>10.2f}{r.forward:>10}"
                     f"{r.backward:>10}{r.queries:>9}")
    lines.append(f"  {'robust (worst case)':<22}{_pct(result.robust_acc):>7}")
    prefixes, refuted = getattr(result, "certifier_examples", {}), getattr(result, "refuted_by", {})
    for r in result.certifiers:
        notes = [f"first {prefixes[r.name]} examples"] if r.name in prefixes else []
        if r.name in refuted:
            notes.append(f"{int(refuted[r.name].sum())} counterexamples")
        lines.append(f"  {'certifier ' + r.name:<22}{_pct(r.accuracy):>7}{r.seconds:>10.2f}"
                     + (f"  ({', '.join(notes)})" if notes else ""))
    lines.append(f"  {'certified (any)':<22}{_pct(result.certified_acc):>7}")
    band = (record or {}).get("certification")
    if band:
        where = "" if band["n_examples"] == result.n_examples else f" on the first {band['n_examples']} examples"
        lines.append(f"  {'unresolved':<22}{_pct(band['unresolved']):>7}  (robust {_pct(band['robust_acc']).strip()} "
                     f"- certified {_pct(band['certified_acc']).strip()}{where})")
    lines += _sections(record or {})
    flags = (record or {}).get("flags", result.flags)
    if flags:
        lines.append("flags:")
        lines += [f"  [{f['severity']}] {f['name']}: {f['explanation']}" for f in flags]
    else:
        lines.append("flags: none")
    lines.append(f"wrote {path}" if path else "leaderboard: not written")
    lines.append(f"wall time {wall:.1f} s")
    return "\n".join(lines)


def _sections(record: dict[str, Any]) -> list[str]:
    lines = []
    groups = record.get("groups")
    if groups:
        for which in ("clean", "robust"):
            if which in groups:
                g = groups[which]
                accs = ", ".join(f"{name} {_pct_or_dash(a)}"
                                 for name, a in zip(groups["names"], g["group_acc"]))
                lines.append(f"  {'worst-group ' + which:<22}{_pct(g['worst_group_acc']):>7}  ({g['worst_group']}; "
                             f"per group %: {accs})")
    selective = record.get("selective")
    if selective:
        coverage = "/".join(f"{100 * c:g}" for c in selective["coverages"])
        for key, label in (("clean", "clean"), ("adversarial", "under attack")):
            if key in selective:
                block = selective[key]
                avg = "/".join(f"{100 * a:.1f}" for a in block["avg_acc"])
                worst = "/".join(f"{100 * a:.1f}" for a in block["worst_group_acc"])
                lines.append(f"  {'selective ' + label:<24}avg {avg}, worst group {worst} % at coverage {coverage} %")
    cert = record.get("wrm_certificate")
    if cert:
        lines.append(f"WRM certificate (gamma {cert['gamma']:g}, {cert['n_examples']} examples, {cert['steps']} ascent steps"
                     + (f"; phi's gradient norm {cert['ascent_grad_norm']:.2g}, Frank-Wolfe gap {cert['phi_gap_bound']:.2g}"
                        if "phi_gap_bound" in cert else "") + "):")
        lines.append(f"  {'gamma_adv':>10}{'rho_test':>10}{'measured':>10}{'certificate':>12}{'if concave':>12}  holds")
        lines += [f"  {r['gamma_adv']:>10.4g}{r['rho_test']:>10.4g}{r['measured_loss']:>10.4f}{r['certificate']:>12.4f}"
                  f"{r.get('certificate_if_concave', float('nan')):>12.4f}  {'yes' if r['bound_holds'] else 'NO'}"
                  for r in cert["rows"]]
    return lines


def format_corruptions(record: dict[str, Any], path: Path | None, wall: float) -> str:
    """The terminal table of a corruptions record: accuracy % per corruption and severity, and the mean."""
    c = record["corruptions"]
    ds = record["dataset"]
    lines = [f"model {record['model']['name']} on {ds['name']}/{ds['split']} ({ds['n_examples']} examples), "
             f"common corruptions, seed {record['environment']['seed']}",
             f"  {'corruption':<16}" + "".join(f"{'sev ' + str(s):>8}" for s in c["severities"]) + f"{'mean':>8}"]
    lines += [f"  {name:<16}" + "".join(f"{100 * a:8.1f}" for a in accs) + f"{100 * c['corruption_mean'][name]:8.1f}"
              for name, accs in c["accuracy"].items()]
    lines += [f"  clean {100 * c['clean_acc']:.1f} %, mean corruption accuracy {100 * c['mean_corruption_acc']:.1f} %, "
              f"correct under every corruption {100 * record['robust_acc']:.1f} %"]
    lines += _sections(record)  # a corruptions record has no WRM certificate (reports.attach_defense_metrics)
    lines += [f"wrote {path}" if path else "leaderboard: not written", f"wall time {wall:.1f} s"]
    return "\n".join(lines)
