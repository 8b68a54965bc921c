"""Rendered leaderboards: tables per (dataset, threat), README.md, index.html (parser and headless
Chromium), plots, and `leaderboard show` printing the README's rows."""
from __future__ import annotations

import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from test_evaluate import toy_dataset, toy_model

from robustbench_lite import cli
from robustbench_lite.evaluation.core import evaluate
from robustbench_lite.leaderboard.records import build_record, write_record
from robustbench_lite.leaderboard.protocol import record_protocol
from robustbench_lite.leaderboard.render import build_tables, render_all, render_html, render_markdown, render_text
from robustbench_lite.threat import ThreatModel

INFO = {"name": "toy", "architecture": "linear", "defense": "none", "dataset": "toy", "weights_sha256": "ab" * 32,
        "parameter_count": 51, "normalization": None, "source": "test", "card": None}


def weak_model() -> torch.nn.Sequential:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)).eval()


def make_record(name: str, model=None, eps: float = 0.05, n: int = 24, attacks=("fgsm",), defense="none"):
    model = toy_model() if model is None else model
    result = evaluate(model, toy_dataset(n), ThreatModel("Linf", eps), attacks=list(attacks), certifiers=[])
    return build_record(result, dict(INFO, name=name, defense=defense), model)


def board(tmp_path: Path) -> Path:
    """strong > weak at two eps, plus a quick run (fewer examples) that is not eligible."""
    for eps in (0.05, 0.1):
        write_record(make_record("strong", eps=eps, defense="pgd-at"), tmp_path)
        write_record(make_record("weak", weak_model(), eps=eps), tmp_path)
    write_record(make_record("quick", eps=0.05, n=12), tmp_path)
    return tmp_path


class TableReader(HTMLParser):
    """Collects every <table id=...> as a list of rows of cell texts."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self._id = None
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self.external: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self._id = a.get("id")
            self.tables[self._id] = []
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []
        for key in ("src", "href"):
            if a.get(key) and ("://" in a[key] or a[key].startswith("//")):
                self.external.append(a[key])

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[self._id].append(self._row)
            self._row = None


def test_tables_group_sort_and_set_apart_other_protocols(tmp_path):
    from robustbench_lite.leaderboard.records import load_records

    tables = build_tables(load_records(board(tmp_path)))
    assert [(t.dataset, t.norm, t.eps) for t in tables] == [("toy", "Linf", 0.05), ("toy", "Linf", 0.1)]
    first = tables[0]
    assert [r["model"]["name"] for r in first.rows] == ["strong", "weak"]
    assert first.rows[0]["robust_acc"] > first.rows[1]["robust_acc"]
    assert [(r["model"]["name"], diff) for r, diff in first.apart] == [("quick", ["n_examples", "subset"])]
    assert not first.registered
    # with the registry's protocol being the quick one, the full runs are the ones set apart
    quick = next(r for r, _ in first.apart)
    tables = build_tables(load_records(tmp_path), {("toy", "Linf", 0.05, "white-box"): record_protocol(quick)})
    assert [r["model"]["name"] for r in tables[0].rows] == ["quick"] and tables[0].registered
    assert sorted(r["model"]["name"] for r, _ in tables[0].apart) == ["strong", "weak"]


def test_markdown_text_and_html_show_the_same_rows(tmp_path):
    from robustbench_lite.leaderboard.records import load_records

    tables = build_tables(load_records(board(tmp_path)))
    md = render_markdown(tables)
    assert md.count("## toy, Linf eps = ") == 2 and "| rank | model | defense | clean % | robust % |" in md
    strong = tables[0].rows[0]
    assert f"| 1 | strong | pgd-at | {100 * strong['clean_acc']:.1f} | {100 * strong['robust_acc']:.1f} |" in md
    assert "Not eligible (other protocol):" in md and "| quick |" in md
    text = render_text(tables)
    assert text.index("strong") < text.index("weak") < text.index("quick")
    reader = TableReader()
    reader.feed(render_html(tables))
    main = reader.tables["toy-linf-0_05"]
    assert main[0][:5] == ["rank", "model", "defense", "clean %", "robust %"]
    assert [row[1] for row in main[1:]] == ["strong", "weak"]
    assert [row[0] for row in reader.tables["toy-linf-0_05-apart"][1:]] == ["quick"]
    assert reader.external == []


def test_render_all_writes_readme_page_and_plots_and_drops_stale_plots(tmp_path):
    board(tmp_path)
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "stale.png").write_bytes(b"old")
    written = render_all(tmp_path)
    names = sorted(p.name for p in written)
    assert names == ["README.md", "index.html", "robust_vs_eps_toy_Linf.png"]
    png = tmp_path / "plots" / "robust_vs_eps_toy_Linf.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not (tmp_path / "plots" / "stale.png").exists()
    assert "![robust_vs_eps_toy_Linf](plots/robust_vs_eps_toy_Linf.png)" in (tmp_path / "README.md").read_text()
    assert not list(tmp_path.rglob("*.partial"))


def test_min_norm_distribution_plot_when_distances_are_recorded(tmp_path):
    rec = make_record("strong")
    n = rec["dataset"]["n_examples"]
    rec["per_example"]["distances"] = {"fmn": [0.01 * i if i % 3 else None for i in range(n)]}
    write_record(rec, tmp_path)
    written = render_all(tmp_path)
    assert "min_norm_toy_Linf-0.05.png" in [p.name for p in written]


def test_leaderboard_show_prints_the_readme_rows(tmp_path, capsys):
    board(tmp_path)
    assert cli.main(["leaderboard", "show", "--leaderboard-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "== toy, Linf eps = 0.05 ==" in out and "robust %" in out and "not eligible" in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("1 ", "2 "))]
    assert [r[1] for r in rows[:2]] == ["strong", "weak"]


def chromium() -> str:
    """Headless Chromium for the page test: $RBL_CHROMIUM, else chromium on PATH (apt-get install -y chromium).

    Without one the test skips with the reason, unless $RBL_REQUIRE_BROWSER=1 (set by .ci/run after it
    installs Chromium), where a missing browser fails it.
    """
    exe = os.environ.get("RBL_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe:
        why = ("no headless Chromium: apt-get install -y chromium (or set RBL_CHROMIUM); "
               "test_markdown_text_and_html_show_the_same_rows checks the same page with a parser")
        if os.environ.get("RBL_REQUIRE_BROWSER") == "1":
            pytest.fail(f"RBL_REQUIRE_BROWSER=1 but {why}")
        pytest.skip(why)
    return exe


def test_index_html_in_headless_chromium_renders_and_sorts(tmp_path):
    browser = chromium()
    board(tmp_path)
    render_all(tmp_path)
    page = tmp_path / "index.html"
    # a click on the "model" header (script appended to a copy) must re-sort the rows by name
    clicked = tmp_path / "clicked.html"
    clicked.write_text(page.read_text().replace(
        "</body>", "<script>document.addEventListener('DOMContentLoaded',function(){"
        "document.querySelector('#toy-linf-0_05 th:nth-child(2)').click();"
        "document.querySelector('#toy-linf-0_05 th:nth-child(2)').click();});</script></body>"))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom"]
    doms = {}
    for f in (page, clicked):
        out = subprocess.run([browser, *flags, f.as_uri()], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        doms[f.name] = out.stdout
    reader = TableReader()
    reader.feed(doms["index.html"])
    assert 'data-ready="1"' in doms["index.html"]  # the inline script ran
    assert [row[1] for row in reader.tables["toy-linf-0_05"][1:]] == ["strong", "weak"]
    reader = TableReader()
    reader.feed(doms["clicked.html"])
    assert [row[1] for row in reader.tables["toy-linf-0_05"][1:]] == ["weak", "strong"]  # sorted by name, descending


def test_minimum_norm_distances_flow_from_the_attack_into_the_record(tmp_path):
    from attacks import FMN

    result = evaluate(toy_model(), toy_dataset(12), ThreatModel("Linf", 0.05), attacks=["pgd", FMN(steps=10)],
                      certifiers=[], individual=True)
    rec = build_record(result, INFO, toy_model())
    dist = rec["per_example"]["distances"]["fmn"]
    assert set(rec["per_example"]["distances"]) == {"fmn"} and len(dist) == 12
    assert any(d is not None for d in dist)
    for d, correct, broken in zip(dist, rec["per_example"]["correct"], rec["per_example"]["attack_success"]["fmn"]):
        if not correct:
            assert d is None  # misclassified points are not attacked
        if broken:
            assert d is not None and d <= 0.05 + 1e-6
    write_record(rec, tmp_path)
    assert "min_norm_toy_Linf-0.05.png" in [p.name for p in render_all(tmp_path)]


def test_group_tables_rank_by_worst_group_and_corruption_tables_by_mean(tmp_path):
    """A higher average (and robust) accuracy does not win a groups table; a corruptions table has a
    column per corruption, no plot against eps, and its own heading in README and index.html."""
    from test_reports import INFO as GROUP_INFO, bar_model, bars, grouped

    from robustbench_lite.corruptions.evaluate import evaluate_corruptions

    records = []
    for name, worst in (("average-winner", 0.2), ("worst-group-winner", 0.6)):
        model = toy_model() if name == "average-winner" else weak_model()
        result = evaluate(model, grouped(), ThreatModel("Linf", 0.05), attacks=["fgsm"], certifiers=[])
        rec = build_record(result, dict(GROUP_INFO, name=name), model)
        rec["groups"]["clean"]["worst_group_acc"] = worst
        records.append(rec)
    assert records[0]["robust_acc"] > records[1]["robust_acc"]  # by robust accuracy the order would flip
    for name, corruptions in (("two", ["jpeg", "brightness"]), ("also-two", ["jpeg", "brightness"])):
        result = evaluate_corruptions(bar_model(), bars(), corruptions=corruptions, n_examples=6)
        rec = build_record(result, dict(GROUP_INFO, name=name), bar_model())
        rec["corruptions"]["mean_corruption_acc"] = 0.9 if name == "also-two" else 0.3
        records.append(rec)
    corrupt, groups = build_tables(records)  # sorted by dataset name: bars, toy-groups
    assert groups.kind == "groups" and [r["model"]["name"] for r in groups.rows] == ["worst-group-winner", "average-winner"]
    assert groups.cells(groups.rows[0], 1)[4] == "60.0" and "worst-group robust %" in groups.columns
    assert corrupt.kind == "corruptions" and [r["model"]["name"] for r in corrupt.rows] == ["also-two", "two"]
    assert corrupt.columns[-2:] == ("jpeg %", "brightness %") and corrupt.cells(corrupt.rows[0], 1)[4] == "90.0"
    markdown, page = render_markdown([corrupt, groups]), render_html([corrupt, groups])
    assert "## bars, common corruptions (ranked by mean corruption accuracy)" in markdown
    assert "| 1 | worst-group-winner |" in markdown and "WRM certificate" not in markdown
    reader = TableReader()
    reader.feed(page)
    assert [row[1] for row in reader.tables["bars-corruptions"][1:]] == ["also-two", "two"]
    assert [row[1] for row in reader.tables["toy-groups-linf-0_05"][1:]] == ["worst-group-winner", "average-winner"]
    for rec in records:
        write_record(rec, tmp_path)
    written = {p.name for p in render_all(tmp_path)}
    assert "corruption_severity_bars.png" in written and not [p for p in written if "robust_vs_eps_bars" in p]


def test_adversarial_rows_list_each_certifiers_own_accuracy():
    from robustbench_lite.leaderboard.render.tables import COLUMNS, row_cells

    record = {"model": {"name": "m", "defense": None}, "clean_acc": 0.9, "robust_acc": 0.6, "certified_acc": 0.5,
              "certifiers": [{"name": "ibp", "certified_acc": 0.25}, {"name": "crown", "certified_acc": 0.5}]}
    cells = dict(zip(COLUMNS, row_cells(record, 1)))
    assert cells["certified %"] == "50.0" and cells["certified % by certifier"] == "ibp 25.0, crown 50.0"
    assert dict(zip(COLUMNS, row_cells({**record, "certifiers": []}, 1)))["certified % by certifier"] == "-"
    # with per-example flags: the examples a certifier proved and no other did ("where it adds")
    flags = {"ibp": [1, 0, 0, 0], "crown": [1, 1, 0, 0], "sdp-fo": [0, 1, 1, 1]}
    record = {**record, "dataset": {"n_examples": 4}, "per_example": {"certified_by": flags},
              "certifiers": [*record["certifiers"], {"name": "sdp-fo", "n_certified": 3, "n_examples": 3}]}
    assert dict(zip(COLUMNS, row_cells(record, 1)))["certified % by certifier"] == \
        "ibp 25.0, crown 50.0, sdp-fo 100.0 of 3 (+2 alone)"


def test_selective_table_and_plot_for_datasets_with_groups(tmp_path):
    """Average against worst-group selective accuracy per coverage, clean and under attack, in the
    README, index.html and the terminal, and a plot of the curves per group; none without groups."""
    from test_reports import INFO as GROUP_INFO, grouped

    from robustbench_lite.leaderboard.render.selective import selective_tables

    for name, model in (("linear", toy_model()), ("weak", weak_model())):
        result = evaluate(model, grouped(), ThreatModel("Linf", 0.05), attacks=["fgsm"], certifiers=[])
        write_record(build_record(result, dict(GROUP_INFO, name=name), model), tmp_path)
    write_record(make_record("plain"), tmp_path)
    tables = build_tables([r for p in sorted(tmp_path.glob("*/*/*.json")) for r in [__import__("json").loads(p.read_text())]])
    [(table, columns, rows)] = selective_tables(tables)
    assert table.dataset == "toy-groups" and columns[3:5] == ("avg @100%", "worst @100%") and columns[-2:] == ("AUC avg", "AUC worst")
    record = next(r for r in table.rows if r["model"]["name"] == table.rows[0]["model"]["name"])
    first = [row for row in rows if row[0] == record["model"]["name"]]
    assert [row[2] for row in first] == ["clean", "under attack"]
    assert first[0][3] == f"{100 * record['clean_acc']:.1f}" and first[1][3] == f"{100 * record['robust_acc']:.1f}"
    assert first[1][4] == f"{100 * record['groups']['robust']['worst_group_acc']:.1f}"
    markdown, page, text = render_markdown(tables), render_html(tables), render_text(tables)
    heading = "Selective classification (Jones et al. 2021): toy-groups, Linf eps = 0.05"
    assert f"## {heading}" in markdown and heading in page and heading in text
    assert "| " + " | ".join(first[1]) + " |" in markdown
    reader = TableReader()
    reader.feed(page)
    assert reader.tables["selective-0"][1:] == rows
    written = {p.name for p in render_all(tmp_path)}
    assert "selective_toy-groups_Linf-0.05.png" in written and not [p for p in written if p.startswith("selective_toy_")]
