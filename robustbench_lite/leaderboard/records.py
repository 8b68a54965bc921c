"""Leaderboard records: one JSON file per model at ``<dir>/<dataset>/<norm>-<eps:g>/<model>.json``.

RobustBench's layout and field names (``clean_acc``, ``robust_acc``, ``autoattack_acc``,
``number_forward_passes``, ``additional_data``; Croce et al. 2021, arXiv 2010.09670), but fractions
in [0, 1], not percent strings, and the per-example flags every aggregate comes from. Every write is
checked against ``schema/record.schema.json`` and is atomic (:mod:`robustbench_lite.atomic`); an
existing file that is corrupt or off-schema is reported with :class:`CorruptFileError` and never
overwritten. Rendering lives in :mod:`.render`.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime as _dt
import importlib.metadata
import json
import logging
import os
import platform
import re
import subprocess
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from .. import __version__
from ..atomic import atomic_write_text
from ..errors import CorruptFileError, UserInputError
from ..evaluation.core import EvaluationResult
from ..hashing import state_dict_sha256
from .merge import STANDARD_AUTOATTACK_SUITE, merge_records
from .sections import add_sections
from ..threat import threat_folder
from ..zoo.cards import normalization_of, parameter_count

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
ENV_DIR = "RBL_LEADERBOARD_DIR"
RESULTS_ENV = "RBL_RESULTS_DIR"
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._+-]+")


# --- where records live ---------------------------------------------------------------------------
def default_results_dir() -> Path:
    """Where ``evaluate`` writes ad-hoc records: ``$RBL_RESULTS_DIR``, else ``./results``."""
    return Path(os.environ[RESULTS_ENV]).expanduser() if os.environ.get(RESULTS_ENV) else Path.cwd() / "results"


def default_leaderboard_dir() -> Path:
    """``$RBL_LEADERBOARD_DIR``; else the checkout's ``leaderboards/`` (editable install); else ./leaderboards."""
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR]).expanduser()
    checkout = Path(__file__).resolve().parents[2] / "leaderboards"
    if checkout.is_dir():
        return checkout
    return Path.cwd() / "leaderboards"


def safe_name(name: str) -> str:
    """A file-name-safe model name (``/`` and spaces become ``-``)."""
    out = _SAFE_NAME.sub("-", str(name)).strip("-.")
    if not out:
        raise UserInputError(f"cannot make a file name from model name {name!r}")
    return out


def record_path(root: str | Path, record: dict[str, Any]) -> Path:
    """``root/<dataset>/<norm>-<eps:g>/<model>.json`` (``<dataset>/corruptions/...``) for a record."""
    threat = record["threat_model"]
    return (Path(root) / safe_name(record["dataset"]["name"])
            / threat_folder(threat["norm"], threat["eps"], threat.get("access", "white-box"))
            / f"{safe_name(record['model']['name'])}.json")


# --- schema ---------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _validator():
    import jsonschema

    text = resources.files("robustbench_lite").joinpath("schema/record.schema.json").read_text("utf-8")
    schema = json.loads(text)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())


def schema_errors(record: Any) -> list[str]:
    """Every way ``record`` breaks the schema, as ``path: message`` lines (empty when valid), then the
    ways a schema-valid record contradicts itself (:func:`consistency_errors`)."""
    errors = sorted(_validator().iter_errors(record), key=lambda e: list(e.absolute_path))
    lines = [f"{'/'.join(str(p) for p in e.absolute_path) or '(record)'}: {e.message}" for e in errors]
    return lines or consistency_errors(record)


def consistency_errors(record: dict[str, Any]) -> list[str]:
    """What the schema cannot say: one flag per example everywhere, flags for exactly the listed
    plug-ins (each named once), certified <= robust <= correct, and aggregates that are the flags' means."""
    per, n = record["per_example"], record["dataset"]["n_examples"]
    lists = {f"per_example/{k}": per[k] for k in ("correct", "robust", "certified", "group") if k in per}
    for group in ("attack_success", "certified_by", "distances"):
        lists.update({f"per_example/{group}/{k}": v for k, v in per.get(group, {}).items()})
    for name, rows in per.get("corruption_correct", {}).items():
        lists.update({f"per_example/corruption_correct/{name}/{i}": row for i, row in enumerate(rows)})
    errors = [f"{path}: {len(flags)} values for n_examples {n}" for path, flags in lists.items() if len(flags) != n]
    for kind, group in (("attacks", "attack_success"), ("certifiers", "certified_by")):
        names = [p["name"] for p in record[kind]]
        if len(set(names)) != len(names) or set(names) != set(per[group]):
            errors.append(f"per_example/{group}: flags for {sorted(per[group])}, {kind} listed {names}")
    if errors:
        return errors
    correct, robust, certified = per["correct"], per["robust"], per["certified"]
    if any(c > r or r > k for c, r, k in zip(certified, robust, correct)):
        errors.append("per_example: certified <= robust <= correct fails")
    if any(r and s for flags in per["attack_success"].values() for r, s in zip(robust, flags)):
        errors.append("per_example/robust: an example an attack broke is marked robust")
    for field, flags in (("clean_acc", correct), ("robust_acc", robust), ("certified_acc", certified)):
        if abs(record[field] - sum(flags) / n) > 1e-9:
            errors.append(f"{field}: {record[field]} is not the mean of per_example flags ({sum(flags)}/{n})")
    return errors


def validate_record(record: dict[str, Any]) -> None:
    """Raise UserInputError naming the first schema violation of a record about to be written."""
    errors = schema_errors(record)
    if errors:
        raise UserInputError(f"leaderboard record does not match the schema: {errors[0]}")


def _no_constant(name: str) -> None:
    """JSON has no NaN or Infinity (records are written with allow_nan=False): a file holding one is corrupt."""
    raise json.JSONDecodeError(f"{name} is not a JSON number", name, 0)


def read_record(path: str | Path) -> dict[str, Any]:
    """Load and check one record; a broken file raises CorruptFileError (the file is left alone)."""
    path = Path(path)
    try:
        record = json.loads(path.read_text("utf-8"), parse_constant=_no_constant)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptFileError(f"{path}: not a readable JSON record ({exc}); fix or move it, it will not be overwritten") from None
    errors = schema_errors(record)
    if errors:
        raise CorruptFileError(f"{path}: not a valid leaderboard record ({errors[0]}); fix or move it, it will not be overwritten")
    return record


# --- building a record ----------------------------------------------------------------------------
def _info_dict(info: Any) -> dict[str, Any]:
    if info is None:
        return {}
    if isinstance(info, dict):
        return dict(info)
    if dataclasses.is_dataclass(info):
        return {f.name: getattr(info, f.name) for f in dataclasses.fields(info)}
    return dict(vars(info))


def model_section(info: Any = None, model: nn.Module | None = None, name: str | None = None) -> dict[str, Any]:
    """The record's ``model`` section from a zoo ``ModelInfo`` (or dict), filled in from the module."""
    d = _info_dict(info)
    card = d.get("card") if isinstance(d.get("card"), dict) else {}
    norm = d.get("normalization")
    if norm is not None and not isinstance(norm, dict):
        norm = _info_dict(norm)
    out = {
        "name": safe_name(name or d.get("name") or "custom"),
        "architecture": d.get("architecture") or (type(model).__name__ if model is not None else None),
        "defense": d.get("defense") or card.get("defense"),
        "parameter_count": int(d.get("parameter_count") or (parameter_count(model) if model is not None else 0)),
        "weights_sha256": d.get("weights_sha256") or (state_dict_sha256(model) if model is not None else None),
        "normalization": norm if norm is not None else (normalization_of(model) if model is not None else None),
        "source": None if d.get("source") is None else str(d.get("source")),
        "training_dataset": d.get("dataset") or card.get("dataset"),
    }
    return out


@lru_cache(maxsize=1)
def _git_state() -> tuple[str | None, bool | None]:
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None, None
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip() != ""
    except (OSError, subprocess.SubprocessError):
        return None, None
    return (commit if re.fullmatch(r"[0-9a-f]{40}", commit) else None), dirty


def environment(result: EvaluationResult) -> dict[str, Any]:
    """Package versions, the checkout's git commit, device, seed and threads of an evaluation."""
    try:  # the installed version, without paying torchvision's import time
        tv = importlib.metadata.version("torchvision")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - torchvision is a dependency
        tv = None
    commit, dirty = _git_state()
    return {
        "python": platform.python_version(), "torch": torch.__version__, "torchvision": tv,
        "robustbench_lite": __version__, "git_commit": commit, "git_dirty": dirty,
        "device": result.device, "seed": int(result.seed), "threads": int(torch.get_num_threads()),
        "batch_size": int(result.batch_size), "platform": platform.platform(),
    }


def _bits(flags: torch.Tensor) -> list[int]:
    return [int(v) for v in flags.tolist()]


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def build_record(result: EvaluationResult, model_info: Any = None, model: nn.Module | None = None,
                 name: str | None = None, additional_data: bool | None = None) -> dict[str, Any]:
    """A schema-valid record of ``result`` for the model described by ``model_info`` / ``model``."""
    idx = result.indices.tolist()
    info = _info_dict(model_info)
    card = info.get("card") if isinstance(info.get("card"), dict) else {}
    if additional_data is None:
        additional_data = bool(card.get("additional_data", False))
    attacks = [{
        "name": r.name, "config": r.config, "robust_acc": r.accuracy, "n_attacked": r.examples,
        "n_broken": int(result.attack_success[r.name].sum()), "seconds": round(r.seconds, 4),
        "forward_passes": r.forward, "backward_passes": r.backward, "queries": r.queries, "flags": r.flags,
    } for r in result.attacks]
    refuted_by = getattr(result, "refuted_by", None) or {}
    prefixes = getattr(result, "certifier_examples", None) or {}
    certifiers = [{
        "name": r.name, "config": r.config, "certified_acc": r.accuracy,
        "n_certified": int(result.certified_by[r.name].sum()), "seconds": round(r.seconds, 4),
        "forward_equivalents": r.forward_equivalents, "status_counts": r.status_counts,
        "n_examples": int(prefixes.get(r.name, result.n_examples)),
        "n_refuted": int(refuted_by[r.name].sum()) if r.name in refuted_by else 0,
    } for r in result.certifiers]
    record: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "model": model_section(model_info, model, name),
        "dataset": {"name": result.dataset, "split": result.split, "n_examples": result.n_examples,
                    "indices": {"start": min(idx), "stop": max(idx) + 1, "sha256": result.indices_sha256}},
        "threat_model": result.threat.to_dict(),
        "clean_acc": result.clean_acc, "robust_acc": result.robust_acc, "certified_acc": result.certified_acc,
        "number_forward_passes": result.number_forward_passes,
        "number_backward_passes": sum(r.backward for r in result.attacks),
        "additional_data": additional_data, "mode": result.mode,
        "attacks": attacks, "certifiers": certifiers, "flags": copy.deepcopy(result.flags),
        "environment": environment(result), "created": _now(),
        "per_example": {
            "correct": _bits(result.correct), "robust": _bits(result.robust), "certified": _bits(result.certified),
            "attack_success": {k: _bits(v) for k, v in result.attack_success.items()},
            "certified_by": {k: _bits(v) for k, v in result.certified_by.items()},
        },
    }
    if refuted_by:  # certifiers' counterexamples that the evaluator checked and counted
        record["per_example"]["refuted_by"] = {k: _bits(v) for k, v in refuted_by.items()}
    distances = getattr(result, "distances", None) or {}
    if distances:  # minimum-norm attacks: null where none was found or the attack did not run
        record["per_example"]["distances"] = {k: [float(d) if d == d and abs(d) != float("inf") else None
                                                  for d in v.tolist()] for k, v in distances.items()}
    _set_autoattack_acc(record)
    add_sections(record, result)  # groups (datasets with groups), corruptions (that threat model)
    validate_record(record)
    return record


def _set_autoattack_acc(record: dict[str, Any]) -> None:
    """``autoattack_acc``: accuracy under the standard AutoAttack suite (``config.suite`` says
    "autoattack-standard": ours or the reference's own code), run on every correct point."""
    per = record["per_example"]
    n_correct = sum(per["correct"])
    for i, attack in enumerate(record["attacks"]):
        if attack["config"].get("suite") == STANDARD_AUTOATTACK_SUITE and (
                record["mode"] == "individual" or i == 0) and attack["n_attacked"] == n_correct:
            broken = per["attack_success"][attack["name"]]
            record["autoattack_acc"] = sum(c and not b for c, b in zip(per["correct"], broken)) / len(broken)
            return


# --- writing ----------------------------------------------------------------------------------------
_NUMBER = r"(?:-?[0-9][0-9.eE+-]*|null)"
_NUMBER_LIST = re.compile(rf"\[(?:\s*{_NUMBER}\s*,)*\s*{_NUMBER}\s*\]")


def to_json_text(data: Any) -> str:
    """Indented JSON with lists of numbers (the per-example flags) kept on one line."""
    text = json.dumps(data, indent=1, allow_nan=False)
    return _NUMBER_LIST.sub(lambda m: "[" + ", ".join(re.findall(_NUMBER, m.group(0))) + "]", text) + "\n"


def atomic_write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` atomically (see :func:`robustbench_lite.atomic.atomic_write`)."""
    atomic_write_text(path, to_json_text(data))


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive flock on the folder itself (POSIX), so two concurrent evaluations of the same
    model merge one after the other instead of the last one dropping the other's attacks."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - no advisory locks on this platform
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def write_record(record: dict[str, Any], root: str | Path | None = None, replace: bool = False) -> Path:
    """Validate, merge into an existing record of the same model (``replace``: overwrite it instead),
    and write atomically; returns the path. A corrupt existing file is never overwritten."""
    validate_record(record)
    path = record_path(default_leaderboard_dir() if root is None else root, record)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _folder_lock(path.parent):
        if path.exists():
            old = read_record(path)
            record = record if replace else merge_records(old, record)
            validate_record(record)
        atomic_write_json(path, record)
    log.info("wrote %s", path)
    return path


# --- reading and rendering ------------------------------------------------------------------------
def load_records(root: str | Path | None = None, dataset: str | None = None) -> list[dict[str, Any]]:
    """Every record under ``root`` (optionally one dataset), sorted by path; corrupt files raise."""
    root = Path(default_leaderboard_dir() if root is None else root)
    if not root.exists():
        return []
    base = root / safe_name(dataset) if dataset else root
    pattern = "*/*.json" if dataset else "*/*/*.json"
    return [read_record(p) for p in sorted(base.glob(pattern))]
