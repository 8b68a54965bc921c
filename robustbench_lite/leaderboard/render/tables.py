"""Leaderboard tables: records grouped by (dataset, threat model), one protocol per table.

Every renderer (terminal, README.md, index.html) draws these same :class:`Table` objects, so the
three show the same rows in the same order: sorted by robust accuracy (then clean accuracy, then
name), as RobustBench sorts a threat model's table; a table of a dataset with groups is sorted by
worst-group clean accuracy and the corruptions table by mean corruption accuracy, each with its own
columns (:data:`KIND_COLUMNS`). A table holds only records made under its
protocol (the registry's, or, with no registry entry, the one most of its records share); the
others are listed apart with the fields in which they differ and are not leaderboard-eligible.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable

from ..protocol import protocol_differences, record_protocol
from ...threat import CORRUPTIONS_NORM

TableKey = tuple[str, str, float, str]

COLUMNS = ("rank", "model", "defense", "clean %", "robust %", "certified %", "unresolved %", "AA %",
           "certified % by certifier")
#: the columns computed on the certification prefix (renamed "... (first N)" when it is one)
BAND_COLUMNS = ("certified %", "unresolved %")
APART_COLUMNS = ("model", "defense", "clean %", "robust %", "certified %", "n", "differs in")


ADVERSARIAL, GROUPS, CORRUPTIONS = "adversarial", "groups", "corruptions"


@dataclass
class Table:
    """One (dataset, norm, eps) table: ``rows`` share ``protocol``; ``apart`` = (record, differing fields).

    ``kind``: ``adversarial``, ``groups`` (its records carry a ``groups`` section) or ``corruptions``.
    """

    dataset: str
    norm: str
    eps: float
    protocol: dict[str, Any] | None
    registered: bool
    rows: list[dict[str, Any]] = field(default_factory=list)
    apart: list[tuple[dict[str, Any], list[str]]] = field(default_factory=list)
    kind: str = ADVERSARIAL
    access: str = "white-box"

    @property
    def title(self) -> str:
        if self.kind == CORRUPTIONS:
            return f"{self.dataset}, common corruptions (ranked by mean corruption accuracy)"
        suffix = " (ranked by worst-group accuracy)" if self.kind == GROUPS else ""
        suffix += ", gray-box: transfer attacks" if self.access != "white-box" else ""
        return f"{self.dataset}, {self.norm} eps = {self.eps:g}{suffix}"

    @property
    def anchor(self) -> str:
        if self.kind == CORRUPTIONS:
            return f"{self.dataset}-corruptions".lower()
        access = "" if self.access == "white-box" else f"-{self.access}"
        return f"{self.dataset}-{self.norm}-{self.eps:g}{access}".lower().replace(".", "_")

    @property
    def corruption_names(self) -> list[str]:
        return [a["name"] for a in (self.protocol or {}).get("attacks", [])]

    @property
    def certification_prefix(self) -> int | None:
        """N when every row's certified and unresolved accuracies are over the first N examples only
        (a certifier of the protocol runs on that prefix); None when they cover every example."""
        prefixes = [int(c["n_examples"]) for c in (self.protocol or {}).get("certifiers", []) if "n_examples" in c]
        return min(prefixes) if prefixes else None

    @property
    def columns(self) -> tuple[str, ...]:
        if self.kind == CORRUPTIONS:
            return KIND_COLUMNS[self.kind] + tuple(f"{n} %" for n in self.corruption_names)
        prefix = self.certification_prefix
        if self.kind == ADVERSARIAL and prefix is not None:
            return tuple(f"{c} (first {prefix})" if c in BAND_COLUMNS else c for c in COLUMNS)
        return KIND_COLUMNS[self.kind]

    @property
    def numeric(self) -> set[int]:
        return {i for i, c in enumerate(self.columns) if c not in ("model", "defense", "worst group")}

    def cells(self, record: dict[str, Any], rank: int) -> list[str]:
        if self.kind == CORRUPTIONS:
            return corruption_cells(record, rank, self.corruption_names)
        return ROW_CELLS[self.kind](record, rank)


def _sort_key(r: dict[str, Any]) -> tuple:
    return (-r["robust_acc"], -r["clean_acc"], r["model"]["name"])


def _group_sort_key(r: dict[str, Any]) -> tuple:
    worst = r["groups"]["clean"]["worst_group_acc"] if "groups" in r else -1.0
    return (-worst, -r["robust_acc"], -r["clean_acc"], r["model"]["name"])


def _corruption_sort_key(r: dict[str, Any]) -> tuple:
    mean = r["corruptions"]["mean_corruption_acc"] if "corruptions" in r else -1.0
    return (-mean, -r["clean_acc"], r["model"]["name"])


def table_kind(norm: str, records: Iterable[dict[str, Any]]) -> str:
    if norm == CORRUPTIONS_NORM:
        return CORRUPTIONS
    return GROUPS if any("groups" in r for r in records) else ADVERSARIAL


def table_key(record: dict[str, Any]) -> TableKey:
    t = record["threat_model"]
    return (record["dataset"]["name"], t["norm"], float(t["eps"]), t.get("access", "white-box"))


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
        kind = table_kind(key[1], recs)
        table = Table(*key[:3], protocol=protocol, registered=registered, kind=kind, access=key[3])
        for r in sorted(recs, key=SORT_KEYS[kind]):
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


def band(record: dict[str, Any]) -> dict[str, Any] | None:
    """The record's certified-to-robust band: its ``certification`` section (on the prefix every
    certifier ran on), or, for a record written before it existed, the same over every example; None
    when no certifier ran."""
    if not record.get("certifiers"):
        return None
    if "certification" in record:
        return record["certification"]
    robust, certified = record["robust_acc"], record["certified_acc"]
    return {"n_examples": record.get("dataset", {}).get("n_examples"), "robust_acc": robust,
            "certified_acc": certified, "unresolved": max(0.0, robust - certified)}


def _by_certifier(record: dict[str, Any]) -> str:
    """Each certifier's own certified accuracy over the examples it ran on, and, where some certifier
    proved examples no other one did, how many ("ibp 51.7, crown 44.0, bab 71.0 of 200 (+6 alone)");
    the certified column is their union."""
    n = record.get("dataset", {}).get("n_examples")
    flags = (record.get("per_example") or {}).get("certified_by") or {}
    # how many certifiers proved each example (only counted with two or more: one alone proves "alone")
    provers = [sum(col) for col in zip(*flags.values())] if len(flags) > 1 else []
    parts = []
    for c in record.get("certifiers") or []:
        ran = c.get("n_examples", n)
        if ran is not None and n is not None and ran < n:
            text = f"{c['name']} {_pct(c['n_certified'] / ran)} of {ran}"
        else:
            text = f"{c['name']} {_pct(c.get('certified_acc'))}"
        alone = sum(1 for f, k in zip(flags.get(c["name"], ()), provers) if f and k == 1)
        parts.append(f"{text} (+{alone} alone)" if alone else text)
    return ", ".join(parts) or "-"


def row_cells(record: dict[str, Any], rank: int) -> list[str]:
    b = band(record)
    return [str(rank), record["model"]["name"], record["model"].get("defense") or "-", _pct(record["clean_acc"]),
            _pct(record["robust_acc"]), _pct(b and b["certified_acc"]), _pct(b and b["unresolved"]),
            _pct(record.get("autoattack_acc")), _by_certifier(record)]


def group_cells(record: dict[str, Any], rank: int) -> list[str]:
    groups = record.get("groups") or {}
    clean, robust = groups.get("clean") or {}, groups.get("robust") or {}
    return [str(rank), record["model"]["name"], record["model"].get("defense") or "-", _pct(record["clean_acc"]),
            _pct(clean.get("worst_group_acc")), clean.get("worst_group", "-"),
            _pct(record["robust_acc"]) if record.get("attacks") else "-", _pct(robust.get("worst_group_acc")),
            _certified(record)]


def corruption_cells(record: dict[str, Any], rank: int, names: list[str]) -> list[str]:
    """Rank, model, defense, clean, mean corruption, all-corruption worst case, then each of ``names``' mean."""
    c = record.get("corruptions") or {}
    per = c.get("corruption_mean") or {}
    means = [_pct(per.get(name)) for name in names]
    return [str(rank), record["model"]["name"], record["model"].get("defense") or "-", _pct(record["clean_acc"]),
            _pct(c.get("mean_corruption_acc")), _pct(record["robust_acc"]), *means]


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
    if table.kind == CORRUPTIONS:
        return (f"{source}: first {p.get('n_examples', '?')} {p.get('split', '?')} examples, each clean and under "
                f"{len(table.corruption_names)} corruptions at severities 1-5 (noise seeded per example, seed "
                f"{p.get('seed')}); 'all corruptions': correct under every corruption and severity; per-corruption "
                "columns: mean accuracy over the five severities")
    text = (f"{source}: first {p.get('n_examples', '?')} {p.get('split', '?')} examples; attacks ({p.get('mode')}): "
            f"{attacks}; certifiers: {certs}; seed {p.get('seed')}")
    prefix = table.certification_prefix
    if table.kind == ADVERSARIAL and prefix is not None:
        text += (f". Certified and unresolved (robust - certified) are over the first {prefix} examples, where "
                 f"every certifier ran; robust is over all {p.get('n_examples', '?')}")
    return text


def _plugin_text(entry: dict[str, Any]) -> str:
    cfg = entry.get("config") or {}
    keys = [k for k in ("steps", "restarts", "n_queries", "version") if k in cfg]
    text = entry["name"] + (f" ({', '.join(f'{k} {cfg[k]}' for k in keys)})" if keys else "")
    return text + (f" on the first {entry['n_examples']} examples" if "n_examples" in entry else "")


GROUP_COLUMNS = ("rank", "model", "defense", "clean %", "worst-group clean %", "worst group", "robust %",
                 "worst-group robust %", "certified %")
CORRUPTION_COLUMNS = ("rank", "model", "defense", "clean %", "mean corruption %", "all corruptions %")
#: kind -> columns; the corruptions table adds one column per corruption (its mean %)
KIND_COLUMNS = {ADVERSARIAL: COLUMNS, GROUPS: GROUP_COLUMNS, CORRUPTIONS: CORRUPTION_COLUMNS}
#: kind -> cells of a row (a corruptions row also needs the table's corruption names: :meth:`Table.cells`)
ROW_CELLS = {ADVERSARIAL: row_cells, GROUPS: group_cells}
SORT_KEYS = {ADVERSARIAL: _sort_key, GROUPS: _group_sort_key, CORRUPTIONS: _corruption_sort_key}
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
            out += text_grid(t.columns, [t.cells(r, i) for i, r in enumerate(t.rows, 1)], t.numeric)
        if t.apart:
            out += ["not eligible (other protocol):"]
            out += ["  " + line for line in text_grid(APART_COLUMNS, [apart_cells(r, d) for r, d in t.apart], APART_NUMERIC)]
        out.append("")
    wrm = wrm_rows(tables)
    if wrm:
        out += [f"== {WRM_TITLE} ==", WRM_NOTE]
        out += text_grid(WRM_COLUMNS, wrm, WRM_NUMERIC)
    from .selective import SELECTIVE_NOTE, selective_text_sections

    for heading, columns, rows, numeric in selective_text_sections(tables):
        out += ["", f"== {heading} ==", SELECTIVE_NOTE] + text_grid(columns, rows, numeric)
    return "\n".join(out).rstrip() + "\n"


WRM_TITLE = "WRM certificate (Sinha, Namkoong & Duchi 2018)"
WRM_NOTE = ("certificate = gamma * rho_test + mean(phi_gamma), an upper bound only if phi's ascent reached the "
            "supremum; plus phi's Frank-Wolfe gap it is one whenever the inner problem is concave, and must then be >= "
            "the mean cross-entropy an independent Lagrangian attack reaches at transport cost rho_test "
            "(gamma_adv = gamma is the paper's radius); see docs/metrics.md")
WRM_COLUMNS = ("model", "gamma", "gamma_adv", "rho_test", "measured loss", "certificate", "cert. if concave",
               "bound holds", "n")
WRM_NUMERIC = {1, 2, 3, 4, 5, 6, 8}


def wrm_rows(tables: list[Table]) -> list[list[str]]:
    """One row per radius of every eligible record with a ``wrm_certificate`` (once per model and data)."""
    seen, out = set(), []
    for t in tables:
        for r in t.rows:
            cert = r.get("wrm_certificate")
            key = (r["model"]["name"], r["model"].get("weights_sha256"), r["dataset"]["indices"]["sha256"])
            if not cert or key in seen:
                continue
            seen.add(key)
            out += [[r["model"]["name"], f"{cert['gamma']:g}", f"{row['gamma_adv']:.4g}", f"{row['rho_test']:.4g}",
                     f"{row['measured_loss']:.4f}", f"{row['certificate']:.4f}",
                     f"{row['certificate_if_concave']:.4f}" if "certificate_if_concave" in row else "-",
                     "yes" if row["bound_holds"] else "NO (violated)", str(cert["n_examples"])]
                    for row in cert["rows"]]
    return out
