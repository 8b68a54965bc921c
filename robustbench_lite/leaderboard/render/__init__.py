"""Rendering the leaderboards from their JSON records: terminal table, README.md, index.html, plots.

``render_all(root)`` rebuilds ``root/README.md``, ``root/index.html`` and ``root/plots/*.png`` from
the records under ``root`` and the protocols of ``root/registry.toml`` (when there is one), each file
written atomically; stale plots are removed.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .html import render_html
from .markdown import render_markdown
from .plots import plot_certified_band, plot_corruption_severity, plot_min_norm, plot_robust_vs_eps
from .selective import plot_selective
from .tables import Table, TableKey, build_tables, render_text

log = logging.getLogger(__name__)

REGISTRY_FILE = "registry.toml"


def registry_protocols(root: Path, registry: str | Path | None = None) -> dict[TableKey, dict[str, Any]] | None:
    """The protocol of every table ``registry`` (default ``root/registry.toml``) lists.

    None when no registry was named and ``root`` has none; a named registry must exist (UserInputError)."""
    from ..protocol import check_one_protocol_per_table, load_registry

    path = Path(registry) if registry is not None else Path(root) / REGISTRY_FILE
    if registry is None and not path.is_file():
        return None
    return check_one_protocol_per_table(load_registry(path))


def tables_for(root: str | Path, dataset: str | None = None, registry: str | Path | None = None) -> list[Table]:
    """The tables of the records under ``root`` (one dataset or all), protocols from ``registry``."""
    from ..records import load_records

    root = Path(root)
    return build_tables(load_records(root, dataset), registry_protocols(root, registry))


def render_all(root: str | Path, registry: str | Path | None = None) -> list[Path]:
    """Write README.md, index.html and plots/ under ``root``; returns the written paths.

    ``registry``: the registry whose protocols decide eligibility (default ``root/registry.toml``)."""
    from ...atomic import atomic_write_text

    root = Path(root)
    tables = tables_for(root, registry=registry)
    plot_dir = root / "plots"
    plots = (plot_robust_vs_eps(tables, plot_dir) + plot_certified_band(tables, plot_dir)
             + plot_min_norm(tables, plot_dir) + plot_corruption_severity(tables, plot_dir)
             + plot_selective(tables, plot_dir))
    for stale in set(plot_dir.glob("*.png")) - set(plots) if plot_dir.exists() else ():
        stale.unlink()
    readme, page = root / "README.md", root / "index.html"
    atomic_write_text(readme, render_markdown(tables, plots, root))
    atomic_write_text(page, render_html(tables, plots, root))
    return [readme, page, *plots]


__all__ = ["Table", "build_tables", "registry_protocols", "render_all", "render_html", "render_markdown",
           "render_text", "tables_for"]
