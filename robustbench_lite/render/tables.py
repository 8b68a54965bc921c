"""Leaderboard tables: records grouped by (dataset, threat model), one protocol per table.

Every renderer (terminal, README.md, index.html) draws these same :class:`Table` objects, so the
three show the same rows in the same order: sorted by robust accuracy (then clean accuracy, then
name), as RobustBench sorts a threat model's table. A table holds only records made under its
protocol (the registry's, or, with no registry entry, the one most of its records share); the
others are listed apart with the fields in which they differ and are not leaderboard-eligible.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable

from ..protocol import protocol_differences, record_protocol

TableKey = tuple[str, str, float]

COLUMNS = ("rank", "model", "defense", "clean %", "robust %", "certified %", "AA %")
APART_COLUMNS = ("model", "defense", "clean %", "robust %", "certified %", "n", "differs in")


@dataclass
class Table:
    """One (dataset, norm, eps) table: ``rows`` share ``protocol``; ``apart`` = (record, differing fields)."""

    dataset: str
    norm: str
    eps: float
    protocol: dict[str, Any] | None
    registered: bool
    rows: list[dict[str, Any]] = field(default_factory=list)
    apart: list[tuple[dict[str, Any], list[str]]] = field(default_factory=list)

    @property
    def title(self) -> str:
        return f"{self.dataset}, {self.norm} eps = {self.eps:g}"

    @property
    def anchor(self) -> str:
        return f"{self.dataset}-{self.norm}-{self.eps:g}".lower().replace(".", "_")


def _sort_key(r: dict[str, Any]) -> tuple:
    return (-r["robust_acc"], -r["clean_acc"], r["model"]["name"])


def table_key(record: dict[str, Any]) -> TableKey:
    t = record["threat_model"]
    return (record["dataset"]["name"], t["norm"], float(t["eps"]))


def build_tables(records: Iterable[dict[str, Any]],
                 protocols: dict[TableKey, dict[str, Any]] | None = None) -> list[Table]:
    """Group records into tables; ``protocols``: the registry's protocol of each table it lists."""
    groups: dict[TableKey, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(table_key(r), []).append(r)
    tables = []
    for key in sorted(groups):
        recs = groups[key]
        protocol = (protocols or {}).get(key)
        registered = protocol is not None
        if protocol is None:  # no registry entry: the protocol most records share
            counts = Counter(json.dumps(record_protocol(r), sort_keys=True) for r in recs)
            protocol = json.loads(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0][0])
        table = Table(*key, protocol=protocol, registered=registered)
        for r in sorted(recs, key=_sort_key):
            diff = protocol_differences(r, protocol)
            if diff:
                table.apart.append((r, diff))
            else:
                table.rows.append(r)
        tables.append(table)
    return tables


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _certified(record: dict[str, Any]) -> str:
    """'-' when no certifier ran: 0 % certified would claim a certifier tried and failed."""
    return _pct(record["certified_acc"]) if record.get("certifiers") else "-"


def row_cells(record: dict[str, Any], rank: int) -> list[str]:
    return [str(rank), record["model"]["name"], record["model"].get("defense") or "-", _pct(record["clean_acc"]),
            _pct(record["robust_acc"]), _certified(record), _pct(record.get("autoattack_acc"))]


def apart_cells(record: dict[str, Any], diff: list[str]) -> list[str]:
    return [record["model"]["name"], record["model"].get("defense") or "-", _pct(record["clean_acc"]),
            _pct(record["robust_acc"]), _certified(record), str(record["dataset"]["n_examples"]),
            ", ".join(diff)]


def describe_protocol(table: Table) -> str:
    """One line: examples, attacks (with non-default-looking configs omitted), certifiers, mode, seed."""
    p = table.protocol or {}
    attacks = ", ".join(_plugin_text(a) for a in p.get("attacks", [])) or "none"
    certs = ", ".join(_plugin_text(c) for c in p.get("certifiers", [])) or "none"
    source = "registry protocol" if table.registered else "no registry entry; most records' protocol"
    return (f"{source}: first {p.get('n_examples', '?')} {p.get('split', '?')} examples; attacks ({p.get('mode')}): "
            f"{attacks}; certifiers: {certs}; seed {p.get('seed')}")


def _plugin_text(entry: dict[str, Any]) -> str:
    cfg = entry.get("config") or {}
    keys = [k for k in ("steps", "restarts", "n_queries", "version") if k in cfg]
    return entry["name"] + (f" ({', '.join(f'{k} {cfg[k]}' for k in keys)})" if keys else "")


NUMERIC = {0, 3, 4, 5, 6}
APART_NUMERIC = {2, 3, 4, 5}


def text_grid(header: Iterable[str], rows: list[list[str]], numeric: set[int]) -> list[str]:
    """Aligned plain-text columns (columns in ``numeric`` right-aligned)."""
    table = [list(header)] + rows
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = ["  ".join(c.rjust(w) if i in numeric else c.ljust(w)
                       for i, (c, w) in enumerate(zip(row, widths))).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def render_text(tables: list[Table]) -> str:
    """The terminal form of the README tables (``robustbench-lite leaderboard show``)."""
    if not tables:
        return "(no leaderboard records)"
    out: list[str] = []
    for t in tables:
        out += [f"== {t.title} ==", describe_protocol(t)]
        if t.rows:
            out += text_grid(COLUMNS, [row_cells(r, i) for i, r in enumerate(t.rows, 1)], NUMERIC)
        if t.apart:
            out += ["not eligible (other protocol):"]
            out += ["  " + line for line in text_grid(APART_COLUMNS, [apart_cells(r, d) for r, d in t.apart], APART_NUMERIC)]
        out.append("")
    return "\n".join(out).rstrip() + "\n"
