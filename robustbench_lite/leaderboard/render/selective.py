"""Selective classification on the rendered leaderboards (Jones et al. 2021, arXiv 2010.14134).

For every table of a dataset with groups whose records carry a ``selective`` section: a table of
average against worst-group selective accuracy at each coverage (clean, and at the adversarial
points when attacks ran) with the area under each curve, and ``plots/selective_<table>.png``: the
accuracy-coverage curve of each group and of the average, one panel per model and input, against the
average coverage (one confidence threshold for all groups). Definitions: docs/metrics.md.
"""
from __future__ import annotations

from pathlib import Path

from .tables import GROUPS, Table, _pct

SELECTIVE_TITLE = "Selective classification (Jones et al. 2021)"
SELECTIVE_NOTE = ("accuracy (%) on the examples whose softmax confidence clears one threshold set for the whole test set "
                  "to reach each coverage; 'worst': the lowest group accuracy at that threshold; AUC: area under the "
                  "accuracy-coverage curve (worst: the lowest group's). Under attack the confidence is the adversarial "
                  "point's (attacks maximise error, not confidence); see docs/metrics.md")
INPUTS = (("clean", "clean"), ("adversarial", "under attack"))


def _coverage(c: float) -> str:
    return f"{100 * c:g}%"


def selective_columns(coverages: list[float]) -> tuple[str, ...]:
    per = [f"{kind} @{_coverage(c)}" for c in coverages for kind in ("avg", "worst")]
    return ("model", "defense", "input", *per, "AUC avg", "AUC worst")


def selective_tables(tables: list[Table]) -> list[tuple[Table, tuple[str, ...], list[list[str]]]]:
    """(table, columns, rows) for every group table with selective sections; a row per model and input."""
    out = []
    for t in tables:
        records = [r for r in t.rows if t.kind == GROUPS and "selective" in r]
        if not records:
            continue
        coverages = records[0]["selective"]["coverages"]
        rows = []
        for r in records:
            section = r["selective"]
            for key, label in INPUTS:
                block = section.get(key)
                if block is None or section["coverages"] != coverages:
                    continue
                cells = [c for avg, worst in zip(block["avg_acc"], block["worst_group_acc"]) for c in (_pct(avg), _pct(worst))]
                rows.append([r["model"]["name"], r["model"].get("defense") or "-", label, *cells,
                             _pct(block["auc"]), _pct(block["worst_group_auc"])])
        out.append((t, selective_columns(coverages), rows))
    return out


def selective_numeric(columns: tuple[str, ...]) -> set[int]:
    return set(range(3, len(columns)))


def plot_selective(tables: list[Table], out_dir: Path) -> list[Path]:
    """One figure per group table: a row of panels per model (clean, under attack), a curve per group
    and the average, selective accuracy (%) against average coverage, from ``per_example.confidence``."""
    from ...metrics import selective_curves
    from .plots import _pyplot, _save

    plt = _pyplot()
    paths = []
    for t, _, _ in selective_tables(tables):
        records = [r for r in t.rows if "confidence" in r["per_example"]]
        if not records:
            continue
        fig, axes = plt.subplots(len(records), 2, figsize=(10, 3.2 * len(records)), squeeze=False, sharey=True)
        for row, r in zip(axes, records):
            per, names = r["per_example"], r["selective"]["names"]
            for ax, (key, label) in zip(row, INPUTS):
                flags = per["correct"] if key == "clean" else per["robust"]
                if key not in per["confidence"]:
                    ax.set_axis_off()
                    continue
                curves = selective_curves(per["confidence"][key], flags, per["group"], num_groups=len(names))
                for name, accs in zip(names, curves["group_acc"]):
                    points = [(c, 100 * a) for c, a in zip(curves["coverage"], accs) if a is not None]
                    if points:
                        ax.plot(*zip(*points), label=name, linewidth=1.2)
                ax.plot(curves["coverage"], [100 * a for a in curves["avg_acc"]], color="black", linestyle="--",
                        linewidth=1.5, label="average")
                ax.set(xlim=(0, 1.02), ylim=(-2, 102), xlabel="average coverage", ylabel="selective accuracy (%)",
                       title=f"{r['model']['name']}: {label}")
                ax.grid(alpha=0.3)
                ax.legend(fontsize=7)
        fig.suptitle(f"{t.dataset}, {t.norm} eps = {t.eps:g}: accuracy-coverage curves per group (softmax confidence)",
                     fontsize=10)
        fig.tight_layout()
        try:
            paths.append(_save(fig, out_dir / f"selective_{t.dataset}_{t.norm}-{t.eps:g}.png"))
        finally:
            plt.close(fig)
    return paths


def selective_text_sections(tables: list[Table]) -> list[tuple[str, tuple[str, ...], list[list[str]], set[int]]]:
    """(heading, columns, rows, numeric columns) of each selective table, for the three renderers."""
    return [(f"{SELECTIVE_TITLE}: {t.dataset}, {t.norm} eps = {t.eps:g}", cols, rows, selective_numeric(cols))
            for t, cols, rows in selective_tables(tables) if rows]


__all__ = ["SELECTIVE_NOTE", "SELECTIVE_TITLE", "plot_selective", "selective_tables", "selective_text_sections"]
