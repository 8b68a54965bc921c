"""The ``robustbench-lite`` command: a thin door to the library (see shared ARCHITECTURE.md).

``robustbench-lite evaluate`` evaluates a model and writes its record (to ``$RBL_RESULTS_DIR``, default
``./results``; the published leaderboards are written by ``leaderboard regenerate``),
``robustbench-lite zoo list`` lists the model zoo, ``robustbench-lite leaderboard show`` prints
the tables, ``leaderboard regenerate`` re-evaluates what changed in ``leaderboards/registry.toml``
and re-renders (:mod:`robustbench_lite.leaderboard.regenerate`), ``robustbench-lite train`` trains a defense (:mod:`robustbench_lite.train`). Every
user error is one line on stderr (``robustbench-lite: error: ...``) and a non-zero exit.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from . import __version__
from .errors import RobustBenchLiteError, SoundnessError, UserInputError
from .leaderboard.render.terminal import format_corruptions, format_result
from .threat import CORRUPTIONS_NORM

PROG = "robustbench-lite"
DEFAULTS = {"model": "mnist5k-cnn-pgd-at", "dataset": "mnist5k", "norm": "Linf", "eps": 0.3,
            "attacks": "pgd", "certifiers": "ibp", "n_examples": 1000, "batch_size": 250, "seed": 0}


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is a one-line UserInputError instead of usage + exit."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserInputError(f"{message} (see '{self.prog} --help')")


def _names(text: str) -> list[str]:
    """``"pgd,apgd"`` -> ["pgd", "apgd"]; ``""`` or ``"none"`` -> []."""
    if text.strip().lower() in ("", "none"):
        return []
    return [s.strip() for s in text.split(",") if s.strip()]


def _eps(text: str) -> float:
    """``0.3`` or a fraction such as ``8/255`` (pixel units of [0, 1] images)."""
    try:
        if "/" in text:
            numerator, denominator = text.split("/", 1)
            return float(numerator) / float(denominator)
        return float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"eps must be a number or a fraction like 8/255, got {text!r}") from None


def path_text(text: str) -> Path:
    """A path option: not empty, no NUL byte (argparse type)."""
    if not text.strip() or "\x00" in text:
        raise argparse.ArgumentTypeError(f"not a usable path: {text!r}")
    return Path(text).expanduser()


def folder_text(text: str) -> Path:
    """A folder option (created when needed): a usable path that is not an existing file (argparse type)."""
    path = path_text(text)
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise argparse.ArgumentTypeError(f"{existing} is a file, not a folder")
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Attack, certify, train and rank image classifiers.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    ev = sub.add_parser("evaluate", help="evaluate a model and write its record (to ./results unless told)",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ev.add_argument("--model", default=DEFAULTS["model"], help="zoo name, weights file or package.module:factory")
    ev.add_argument("--arch", default=None, help="architecture of a state-dict file")
    ev.add_argument("--dataset", default=DEFAULTS["dataset"], help="dataset name")
    ev.add_argument("--split", default="test", help="split of the dataset")
    ev.add_argument("--threat", choices=("lp", CORRUPTIONS_NORM), default="lp",
                    help="lp: the --norm/--eps ball with --attacks/--certifiers; corruptions: accuracy under every "
                         "common corruption at five severities (docs/metrics.md)")
    ev.add_argument("--corruptions", default=None, help="with --threat corruptions: comma-separated corruption names "
                                                        "(default: all)")
    ev.add_argument("--norm", default=DEFAULTS["norm"], help="Linf or L2")
    ev.add_argument("--eps", type=_eps, default=DEFAULTS["eps"], help="radius in pixel units of [0, 1] images, e.g. 0.3 or 8/255")
    ev.add_argument("--attacks", default=None, help=f"comma-separated attack names, or none (default {DEFAULTS['attacks']})")
    ev.add_argument("--certifiers", default=None,
                    help=f"comma-separated certifier names, or none (default {DEFAULTS['certifiers']})")
    ev.add_argument("--certifier-examples", default=None, metavar="NAME=N[,NAME=N]",
                    help="run these certifiers on the first N examples only (e.g. bab=200: a complete verifier on a "
                         "prefix; the others read 'skipped: beyond the first N examples')")
    ev.add_argument("--n-examples", type=int, default=DEFAULTS["n_examples"], help="the first N of the split")
    ev.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"], help="examples per batch")
    ev.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="run seed (mixed with each example's index)")
    ev.add_argument("--individual", action="store_true", help="run every attack on every correct point")
    ev.add_argument("--device", default="cpu", help="torch device")
    ev.add_argument("--results-dir", type=folder_text, default=None,
                    help="where the record goes (default: $RBL_RESULTS_DIR, else ./results)")
    ev.add_argument("--leaderboard-dir", type=folder_text, default=None,
                    help="write into this leaderboard folder instead of the results folder")
    ev.add_argument("--no-write", action="store_true", help="do not write the record")
    ev.add_argument("--replace", action="store_true", help="overwrite the model's record instead of merging into it")
    ev.add_argument("--json", action="store_true", help="print the record as JSON instead of the table")
    ev.add_argument("--download", action="store_true", help="download torchvision datasets when missing")
    ev.add_argument("--data-dir", type=folder_text, default=None, help="where torchvision datasets live")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
    ev.add_argument("--no-resume", action="store_true",
                    help="do not keep per-batch results under <results-dir>/.state (kept by default while "
                         "writing, so an interrupted run resumes where it stopped)")
    ev.add_argument("--no-defense-metrics", action="store_true",
                    help="skip the WRM certificate of models whose card says defense wrm (group accuracies are always kept)")
    ev.add_argument("--masking-checks", action="store_true",
                    help="also run the gradient-masking checks that re-run small attacks (checks.ATTACK_CHECKS)")
    ev.add_argument("--cross-check", action="store_true",
                    help="also run every certifier (CROWN, LP and SDP included) on a seeded sample of 16 examples an "
                         "attack refuted, and fail if any certifies one (leaderboard regenerate always does)")
    ev.set_defaults(handler=cmd_evaluate)

    zoo = sub.add_parser("zoo", help="the model zoo").add_subparsers(dest="zoo_command", metavar="ACTION")
    zoo.required = True
    zoo.add_parser("list", help="list the shipped models").set_defaults(handler=cmd_zoo_list)

    board = sub.add_parser("leaderboard", help="leaderboard records").add_subparsers(dest="board_command", metavar="ACTION")
    board.required = True
    show = board.add_parser("show", help="print the leaderboard tables (as in leaderboards/README.md)")
    show.add_argument("--dataset", default=None)
    show.add_argument("--leaderboard-dir", "--root", type=folder_text, default=None, dest="leaderboard_dir")
    show.add_argument("--registry", type=path_text, default=None, help="default: <leaderboard-dir>/registry.toml")
    show.set_defaults(handler=cmd_leaderboard_show)
    regen = board.add_parser("regenerate", help="re-evaluate registry entries whose inputs changed, then re-render")
    regen.add_argument("--only", default=None, metavar="PATTERN", help="glob on the model name or dataset/norm-eps/model")
    regen.add_argument("--dry-run", action="store_true", help="list what would run and why; evaluate nothing")
    regen.add_argument("--force", action="store_true", help="re-run every selected entry")
    regen.add_argument("--no-resume", action="store_true", help="do not resume from or keep per-batch results")
    regen.add_argument("--registry", type=path_text, default=None, help="default: <leaderboard-dir>/registry.toml")
    regen.add_argument("--leaderboard-dir", "--root", type=folder_text, default=None, dest="leaderboard_dir",
                       help="where the records, README.md and index.html go (default: the checkout's leaderboards/)")
    regen.set_defaults(handler=cmd_leaderboard_regenerate)
    render = board.add_parser("render", help="re-render README.md, index.html and plots from the JSON records")
    render.add_argument("--leaderboard-dir", "--root", type=folder_text, default=None, dest="leaderboard_dir")
    render.add_argument("--registry", type=path_text, default=None, help="default: <leaderboard-dir>/registry.toml")
    render.set_defaults(handler=cmd_leaderboard_render)

    train = sub.add_parser("train", help="train a model with a defense")
    try:
        from . import train as train_module
    except ImportError as exc:  # pragma: no cover - the training module ships with the package
        train.set_defaults(handler=lambda args, error=exc: _unavailable("train", error))
    else:
        train_module.add_arguments(train)
        train.set_defaults(handler=train_module.run)
    return parser


def _unavailable(what: str, exc: Exception) -> int:
    raise UserInputError(f"'{what}' is not available: {exc}")


# --- commands -------------------------------------------------------------------------------------
def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluation.distributed import init_from_env, shutdown
    from .evaluation.core import _resolve, resolve_device
    from .evaluation.outcome import certifier_prefixes
    from .leaderboard.jobs import RunOptions, cli_job, run_job
    from .leaderboard.records import read_record, write_record

    started = time.perf_counter()
    corruptions = args.threat == CORRUPTIONS_NORM
    if corruptions:
        for option in ("attacks", "certifiers", "certifier_examples"):
            if getattr(args, option) is not None:
                flag = "--" + option.replace("_", "-")
                raise UserInputError(f"{flag} does not apply to --threat corruptions (the corruptions are the threat)")
        if args.corruptions is not None and not args.corruptions.strip():
            raise UserInputError("--corruptions is empty: name at least one corruption or leave the option out")
        from .corruptions.evaluate import corruption_names

        attacks, certifiers, prefixes = corruption_names(args.corruptions), [], {}
    else:
        if args.corruptions is not None:
            raise UserInputError("--corruptions needs --threat corruptions")
        from .threat import ThreatModel

        ThreatModel(args.norm, args.eps)  # a bad norm or eps fails before anything loads
        attacks = _names(DEFAULTS["attacks"] if args.attacks is None else args.attacks)
        certifiers = _names(DEFAULTS["certifiers"] if args.certifiers is None else args.certifiers)
        _check_plugins(attacks, certifiers)
        prefixes = _certifier_examples(args.certifier_examples)
        certifier_prefixes(prefixes, [name for name, _ in _resolve(certifiers, "certifier")], args.n_examples)
    resolve_device(args.device)
    job = cli_job(args.model, args.dataset, args.split, CORRUPTIONS_NORM if corruptions else args.norm,
                  0.0 if corruptions else args.eps, attacks, certifiers, prefixes, args.n_examples, args.batch_size,
                  args.seed, args.individual or corruptions)
    root = _results_dir(args)
    from .evaluation.checks import ATTACK_CHECKS, CHECKS

    group = init_from_env(args.device)  # under torchrun: the batches are shared over the ranks; rank 0 writes
    bar = _progress_bar(args) if group.is_main and not corruptions else None
    options = RunOptions(device=args.device, arch=args.arch, data_dir=args.data_dir, download=args.download,
                         state_root=None if args.no_write or args.no_resume else root, progress=bar, group=group,
                         checks=CHECKS + ATTACK_CHECKS if args.masking_checks else None,
                         unsupported="skip" if args.certifiers is None else "error",
                         defense_metrics=not args.no_defense_metrics, cross_check=args.cross_check)
    try:
        run = run_job(job, options)
    except SoundnessError as err:
        if getattr(err, "result", None) is not None and not args.json and group.is_main:
            print(format_result(err.result, args.model, None, time.perf_counter() - started))
        raise
    finally:
        if bar is not None:
            bar.close()
        shutdown(group)
    if run.record is None:  # not rank 0
        return 0
    for flag in getattr(run.result, "flags", []):
        if flag["name"] == "certifier_unsupported":  # a default certifier could not run: say so once
            print(f"{PROG}: warning: {flag['explanation']}", file=sys.stderr)
    path = None if args.no_write else write_record(run.record, root, replace=args.replace)
    run.done()
    if args.json:
        print(json.dumps(read_record(path) if path else run.record, indent=1))
    elif corruptions:
        print(format_corruptions(run.record, path, time.perf_counter() - started))
    else:
        print(format_result(run.result, run.record["model"]["name"], path, time.perf_counter() - started, run.record))
    return 0


def _results_dir(args: argparse.Namespace) -> Path:
    """Where ``evaluate`` writes: ``--leaderboard-dir`` when given (a leaderboard folder, e.g. one's own),
    else ``--results-dir``, else ``$RBL_RESULTS_DIR``, else ``./results``: never the published leaderboards
    unless asked (those are written by ``leaderboard regenerate``)."""
    from .leaderboard.records import default_results_dir

    if args.leaderboard_dir is not None:
        return Path(args.leaderboard_dir)
    return Path(args.results_dir) if args.results_dir is not None else default_results_dir()


def _certifier_examples(text: str | None) -> dict[str, int]:
    """``--certifier-examples bab=200,mip=50`` -> ``{"bab": 200, "mip": 50}`` (names checked by evaluate)."""
    out: dict[str, int] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        name, sep, count = item.partition("=")
        if not sep or not count.strip().isdigit():
            raise UserInputError(f"--certifier-examples takes NAME=N items, got {item.strip()!r}")
        out[name.strip().lower()] = int(count)
    return out


def _check_plugins(attacks: list[str], certifiers: list[str]) -> None:
    """Unknown names fail before the model and data are loaded."""
    from attacks import ATTACKS
    from certify import CERTIFIERS

    for name in attacks:
        ATTACKS.get(name)
    for name in certifiers:
        CERTIFIERS.get(name)


class _Bar:
    """A tqdm bar on stderr (only on a terminal) driven by the evaluator's progress callback."""

    def __init__(self) -> None:
        from tqdm.auto import tqdm

        self._bar = tqdm(total=0, unit="ex", desc="evaluate", leave=False, disable=None, file=sys.stderr)

    def __call__(self, done: int, total: int) -> None:
        self._bar.total = total
        self._bar.update(done - self._bar.n)

    def close(self) -> None:
        self._bar.close()


def _progress_bar(args: argparse.Namespace) -> _Bar | None:
    return None if args.no_progress or args.json else _Bar()


def cmd_zoo_list(args: argparse.Namespace) -> int:
    from .zoo import list_models

    rows = list_models()
    if not rows:
        print("(the zoo is empty)")
        return 0
    cols = ["name", "dataset", "architecture", "defense", "clean_acc", "parameter_count"]
    cells = [cols] + [["-" if r.get(c) is None else (f"{100 * r[c]:.1f}" if c == "clean_acc" else str(r[c]))
                       for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    return 0


def _board_dir(args: argparse.Namespace) -> Path:
    from .leaderboard.records import default_leaderboard_dir

    return Path(args.leaderboard_dir) if args.leaderboard_dir is not None else default_leaderboard_dir()


def cmd_leaderboard_show(args: argparse.Namespace) -> int:
    from .leaderboard.render import render_text, tables_for

    print(render_text(tables_for(_board_dir(args), args.dataset, args.registry)), end="")
    return 0


def cmd_leaderboard_render(args: argparse.Namespace) -> int:
    from .leaderboard.render import render_all

    for path in render_all(_board_dir(args), args.registry):
        print(f"wrote {path}")
    return 0


def cmd_leaderboard_regenerate(args: argparse.Namespace) -> int:
    from .evaluation.distributed import init_from_env, shutdown
    from .leaderboard.regenerate import RUN, regenerate

    group = init_from_env()
    try:
        def announce(planned: Any) -> None:
            print(f"[rank {group.rank}] evaluating {planned.job.key}", file=sys.stderr, flush=True)

        report = regenerate(_board_dir(args), args.registry, only=args.only, force=args.force, dry_run=args.dry_run,
                            resume=not args.no_resume, group=group, on_job=announce)
    finally:
        shutdown(group)
    if not group.is_main:
        return 0
    for p in report.planned:
        print(f"{p.action:<5} {p.job.key}: {'; '.join(p.reasons)}")
    counts = {a: sum(p.action == a for p in report.planned) for a in (RUN, "skip", "unavailable", "error")}
    if args.dry_run:
        print(f"would run {counts[RUN]}, skip {counts['skip']}; unavailable {counts['unavailable']}, "
              f"error {counts['error']}")
        _error_when_not_evaluated(report, ("error",), {})
        return 0
    for key, message in report.failed.items():
        print(f"failed {key}: {message}")
    print(f"ran {len(report.ran)}, skipped {counts['skip']}, unavailable {counts['unavailable']}, "
          f"error {counts['error']}, failed {len(report.failed)}; rendered {len(report.rendered)} file(s); "
          f"wall time {report.seconds:.1f} s")
    _error_when_not_evaluated(report, ("error", "unavailable"), report.failed)
    return 0


def _error_when_not_evaluated(report: Any, actions: tuple[str, ...], failed: dict[str, str]) -> None:
    """After regenerate's per-entry lines: one error line (exit 2) when an entry was refused or failed."""
    bad = [(p.job.key, "; ".join(p.reasons)) for p in report.planned if p.action in actions] + list(failed.items())
    if bad:
        raise UserInputError(f"{len(bad)} of {len(report.planned)} registry entries were not evaluated (listed "
                             f"above); the first: {bad[0][0]}: {bad[0][1]}")


# --- entry point ----------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 I/O error, 2 user error, 3 soundness, 130 interrupted)."""
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR,
                            format=f"{PROG}: %(levelname)s: %(message)s")
        handler = getattr(args, "handler", None)
        if handler is None:
            raise UserInputError(f"choose a command: evaluate, zoo list, leaderboard show|regenerate|render, train "
                                 f"(see '{PROG} --help')")
        return int(handler(args) or 0)
    except RobustBenchLiteError as err:
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return err.exit_code
    except OSError as err:  # unwritable leaderboard folder, full disk, unreadable file
        print(f"{PROG}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except SystemExit as exc:  # --help / --version
        return exc.code if isinstance(exc.code, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
