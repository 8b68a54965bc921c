"""Leaderboard plots (matplotlib, Agg backend, PNG).

- ``robust_vs_eps_<dataset>_<norm>.png``: robust accuracy against eps for every model of a dataset
  (eps = 0 is the clean accuracy), one line per model, from the eligible records.
- ``certified_band_<dataset>_<norm>-<eps>.png``: for a table whose records ran certifiers, each model
  as a band from certified to robust accuracy (the record's ``certification``: on the examples every
  certifier ran on), labelled with its unresolved accuracy: the true robust accuracy lies inside it.
- ``min_norm_<dataset>_<norm>-<eps>.png``: when a minimum-norm attack ran (the record holds
  ``per_example.distances``), the empirical distribution of the per-example minimal perturbations
  it found, one curve per model (the fraction of examples broken within a radius).
- ``corruption_severity_<dataset>.png``: for the common-corruptions table, accuracy against severity
  (0 = clean), averaged over the corruptions, one line per model.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .tables import CORRUPTIONS, Table, band

log = logging.getLogger(__name__)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _finish(fig: Any, ax: Any, path: Path) -> Path:
    """Grid, legend and layout shared by every plot, then save and close the figure."""
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        return _save(fig, path)
    finally:
        _pyplot().close(fig)


def _save(fig: Any, path: Path) -> Path:
    """The figure as PNG, written atomically (no timestamped metadata, so unchanged plots stay byte-equal)."""
    import io

    from ...atomic import atomic_write_bytes

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    atomic_write_bytes(path, buffer.getvalue())
    return path


def plot_robust_vs_eps(tables: list[Table], out_dir: Path) -> list[Path]:
    """One figure per (dataset, norm): robust accuracy (%) against eps, a line per model."""
    plt = _pyplot()
    series: dict[tuple[str, str], dict[str, dict[float, float]]] = {}
    clean: dict[tuple[str, str], dict[str, float]] = {}
    for t in tables:
        if t.kind == CORRUPTIONS or t.access != "white-box":  # no radius to plot against; another attacker
            continue
        for r in t.rows:
            name = r["model"]["name"]
            series.setdefault((t.dataset, t.norm), {}).setdefault(name, {})[t.eps] = 100 * r["robust_acc"]
            clean.setdefault((t.dataset, t.norm), {})[name] = 100 * r["clean_acc"]
    paths = []
    for (dataset, norm), models in sorted(series.items()):
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, points in sorted(models.items()):
            xs = [0.0] + sorted(points)
            ys = [clean[(dataset, norm)][name]] + [points[e] for e in sorted(points)]
            ax.plot(xs, ys, marker="o", label=name)
        ax.set(xlabel=f"{norm} eps", ylabel="robust accuracy (%)", ylim=(-2, 102),
               title=f"{dataset}: robust accuracy against eps ({norm})")
        paths.append(_finish(fig, ax, out_dir / f"robust_vs_eps_{dataset}_{norm}.png"))
    return paths


def plot_certified_band(tables: list[Table], out_dir: Path) -> list[Path]:
    """One figure per table with certifiers: a horizontal band per model (in the table's order) from
    certified to robust accuracy (%), with its unresolved accuracy beside it."""
    plt = _pyplot()
    paths = []
    for t in tables:
        rows = [(r, band(r)) for r in t.rows] if t.kind != CORRUPTIONS else []
        rows = [(r, b) for r, b in rows if b is not None]
        if not rows:
            continue
        fig, ax = plt.subplots(figsize=(7.5, 1.4 + 0.45 * len(rows)))
        for k, (r, b) in enumerate(rows):
            y, lo, hi = len(rows) - 1 - k, 100 * b["certified_acc"], 100 * b["robust_acc"]
            ax.barh(y, hi - lo, left=lo, height=0.5, color="tab:blue", alpha=0.3,
                    label="unresolved (robust - certified)" if k == 0 else None)
            ax.plot([lo], [y], "|", color="tab:green", markersize=16, markeredgewidth=2,
                    label="certified" if k == 0 else None)
            ax.plot([hi], [y], "|", color="tab:red", markersize=16, markeredgewidth=2,
                    label="robust" if k == 0 else None)
            ax.text(min(hi + 1.5, 100), y, f"{100 * b['unresolved']:.1f}", va="center", fontsize=8)
        ax.set_yticks(range(len(rows)), [r["model"]["name"] for r, _ in reversed(rows)])
        prefix = t.certification_prefix
        where = f", first {prefix} examples" if prefix is not None else ""
        ax.set(xlim=(-2, 108), ylim=(-0.8, len(rows) - 0.2 + 0.8), xlabel="accuracy (%)",
               title=f"{t.title}: certified to robust{where}")
        paths.append(_finish(fig, ax, out_dir / f"certified_band_{t.dataset}_{t.norm}-{t.eps:g}.png"))
    return paths


def min_norm_distances(record: dict[str, Any]) -> dict[str, list[float]]:
    """Finite per-example minimal perturbations of each minimum-norm attack in a record."""
    per = record.get("per_example", {}).get("distances") or {}
    return {name: [float(d) for d in values if d is not None] for name, values in per.items()}


def plot_min_norm(tables: list[Table], out_dir: Path) -> list[Path]:
    """One figure per table whose records hold minimal perturbations: the fraction of examples
    broken within radius r, against r, per model and attack."""
    plt = _pyplot()
    paths = []
    for t in tables:
        curves = {(r["model"]["name"], a): sorted(d) for r in t.rows for a, d in min_norm_distances(r).items() if d}
        if not curves:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for (model, attack), dists in sorted(curves.items()):
            n = next(r["dataset"]["n_examples"] for r in t.rows if r["model"]["name"] == model)
            ax.step(dists, [100 * (i + 1) / n for i in range(len(dists))], where="post", label=f"{model} ({attack})")
        ax.axvline(t.eps, color="grey", linestyle="--", linewidth=1, label=f"eps = {t.eps:g}")
        ax.set(xlabel=f"minimal {t.norm} perturbation found", ylabel="examples broken within it (%)",
               title=f"{t.title}: minimal perturbations")
        paths.append(_finish(fig, ax, out_dir / f"min_norm_{t.dataset}_{t.norm}-{t.eps:g}.png"))
    return paths


def plot_corruption_severity(tables: list[Table], out_dir: Path) -> list[Path]:
    """One figure per corruptions table: mean accuracy over the corruptions (%) at each severity."""
    plt = _pyplot()
    paths = []
    for t in tables:
        if t.kind != CORRUPTIONS or not t.rows:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in t.rows:
            acc = r["corruptions"]["accuracy"]
            per_severity = [sum(a[s] for a in acc.values()) / len(acc) for s in range(len(r["corruptions"]["severities"]))]
            ax.plot(range(len(per_severity) + 1), [100 * r["clean_acc"]] + [100 * a for a in per_severity], marker="o",
                    label=f"{r['model']['name']} (mean {100 * r['corruptions']['mean_corruption_acc']:.1f})")
        ax.set(xlabel="severity (0 = clean)", ylabel="accuracy, mean over corruptions (%)",
               title=f"{t.dataset}: accuracy under common corruptions")
        paths.append(_finish(fig, ax, out_dir / f"corruption_severity_{t.dataset}.png"))
    return paths

