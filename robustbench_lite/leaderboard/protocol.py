"""What the published leaderboards hold (``leaderboards/registry.toml``) and how a record is judged.

A *job* is one (model, dataset, threat model) evaluation listed in the registry. Its *protocol* is
what makes two numbers comparable (RobustBench's standardised evaluation, Croce et al. 2021,
arXiv 2010.09670): the evaluated subset, the attack suite and every attack's configuration, the
certifiers and theirs (and, for a certifier listed as ``{name = "bab", n_examples = 200}``, the
prefix of the examples it runs on), the mode and the seed. Its *inputs* add what can change a number without
changing the protocol: the weights (sha256), the evaluated data (sha256 of the tensors) and the
source code of the plug-ins and of the evaluator (sha256 per file, found by following the
module-level imports of each plug-in's module). A record is leaderboard-eligible when its protocol
equals the registry's; it is up to date when its stored inputs equal the current ones.

An entry with ``norm = "corruptions"`` evaluates the common-corruptions threat model
(:mod:`robustbench_lite.corruptions.evaluate`): no eps, no attacks or certifiers; ``corruptions`` lists the
corruptions (default: all), which become the protocol's "attacks" with their severity parameters.
"""
from __future__ import annotations

import ast
import copy
import json
import logging
import tomllib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

from ..errors import UserInputError, short_repr
from ..hashing import file_sha256, indices_sha256, sha256_json
from ..threat import CORRUPTIONS_NORM, threat_folder

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
PROJECT_PACKAGES = ("robustbench_lite", "attacks", "certify")
#: evaluator modules whose source changes every number (their own imports are followed too)
EVALUATOR_MODULES = ("robustbench_lite.evaluation.core", "robustbench_lite.evaluation.checks", "robustbench_lite.leaderboard.sections",
                     "robustbench_lite.defenses.wrm")
MODES = ("cascade", "individual")
#: the largest n_examples (and batch size) a registry entry may ask for: more than any dataset here holds
MAX_EXAMPLES = 100_000_000
_ENTRY_KEYS = {"model", "dataset", "split", "norm", "eps", "attacks", "certifiers", "n_examples", "seed", "mode",
               "batch_size", "corruptions", "access"}
#: a certifier's registry option that is the evaluator's, not the certifier's: run it on the first N examples
PREFIX_KEY = "n_examples"


@dataclass(frozen=True)
class Job:
    """One registry evaluation: ``model`` on the first ``n_examples`` of ``dataset``/``split`` at one eps.

    ``attacks`` / ``certifiers``: ``(name, kwargs)`` pairs (kwargs as a sorted tuple of items).
    """

    model: str
    dataset: str
    split: str
    norm: str
    eps: float
    attacks: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...]
    certifiers: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...]
    n_examples: int
    seed: int = 0
    mode: str = "cascade"
    access: str = "white-box"
    batch_size: int = field(default=250, compare=False)

    @property
    def table(self) -> tuple[str, str, float, str]:
        """The (dataset, norm, eps, access) table the job's record belongs to."""
        return (self.dataset, self.norm, self.eps, self.access)

    @property
    def key(self) -> str:
        """``dataset/norm-eps/model``: the record's place under the leaderboard folder."""
        return f"{self.dataset}/{threat_folder(self.norm, self.eps, self.access)}/{self.model}"

    @property
    def is_corruptions(self) -> bool:
        return self.norm == CORRUPTIONS_NORM

    def plugins(self, kind: str) -> list[Any]:
        """Fresh plug-in instances (registry name + the registry's keyword arguments; a certifier's
        ``n_examples`` is the evaluator's, see :meth:`certifier_examples`)."""
        from ..evaluation.core import _registry

        if self.is_corruptions:
            return []
        registry = _registry(kind)
        specs = self.attacks if kind == "attack" else self.certifiers
        out = []
        for name, kwargs in specs:
            try:
                out.append(registry.create(name, **{k: v for k, v in kwargs if k != PREFIX_KEY}))
            except TypeError as exc:
                raise UserInputError(f"registry entry {self.key}: bad options for {kind} {name!r}: {exc}") from None
        return out

    def certifier_examples(self) -> dict[str, int]:
        """``{certifier name (as the evaluator names it): N}`` for certifiers listed with ``n_examples = N``
        below the job's own: they run on the first N examples only (e.g. a complete verifier)."""
        from ..evaluation.core import _resolve

        names = [name for name, _ in _resolve(self.plugins("certifier"), "certifier")]
        return {name: dict(kwargs)[PREFIX_KEY] for name, (_, kwargs) in zip(names, self.certifiers)
                if dict(kwargs).get(PREFIX_KEY, self.n_examples) < self.n_examples}


# --- reading the registry -------------------------------------------------------------------------
def _specs(value: Any, what: str, where: str) -> tuple[tuple[str, tuple[tuple[str, Any], ...]], ...]:
    if not isinstance(value, list):
        raise UserInputError(f"{where}: '{what}' must be a list of names or {{name = ..., option = ...}} tables")
    out = []
    for item in value:
        if isinstance(item, str) and item.strip():
            out.append((item.strip().lower(), ()))
        elif isinstance(item, dict) and isinstance(item.get("name"), str) and item["name"].strip():
            opts = {k: v for k, v in item.items() if k != "name"}
            bad = sorted(k for k, v in opts.items() if not (_scalar(v) or (isinstance(v, list)
                                                                           and all(_scalar(e) for e in v))))
            if bad:
                raise UserInputError(f"{where}: {what} option(s) {', '.join(bad)} of {item['name']!r} must be "
                                     "strings, numbers, booleans or lists of them")
            opts = {k: tuple(v) if isinstance(v, list) else v for k, v in opts.items()}
            if PREFIX_KEY in opts:
                prefix = opts[PREFIX_KEY]
                if what != "certifiers":
                    raise UserInputError(f"{where}: {PREFIX_KEY} applies to certifiers only "
                                         "(attacks see every example)")
                if isinstance(prefix, bool) or not isinstance(prefix, int) or prefix < 1:
                    raise UserInputError(f"{where}: certifier {item['name']!r}: {PREFIX_KEY} must be a positive "
                                         f"integer, got {prefix!r}")
            out.append((item["name"].strip().lower(), tuple(sorted(opts.items()))))
        else:
            raise UserInputError(f"{where}: bad {what} item {short_repr(item)}")
    return tuple(out)


def _scalar(value: Any) -> bool:
    return isinstance(value, (str, int, float, bool))


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


#: the type each registry key must have (attacks and certifiers are checked by _specs), and how to say it
_KEY_TYPES: dict[str, tuple[Any, str]] = {
    "model": (_text, "a non-empty string"), "dataset": (_text, "a non-empty string"),
    "split": (_text, "a non-empty string"), "norm": (_text, "a string (Linf, L2 or corruptions)"),
    "mode": (_text, f"one of {', '.join(MODES)}"),
    "eps": (lambda v: _number(v) or (isinstance(v, list) and bool(v) and all(_number(e) for e in v)),
            "a number or a non-empty list of numbers"),
    "n_examples": (lambda v: _integer(v) and 1 <= v <= MAX_EXAMPLES, f"an integer from 1 to {MAX_EXAMPLES:,}"),
    "seed": (_integer, "an integer"),
    "batch_size": (lambda v: _integer(v) and 1 <= v <= MAX_EXAMPLES, f"an integer from 1 to {MAX_EXAMPLES:,}"),
    "corruptions": (lambda v: isinstance(v, list) and bool(v) and all(_text(e) for e in v),
                    "a non-empty list of corruption names (leave it out for all)"),
}


def _check_types(entry: dict[str, Any], where: str) -> None:
    for key, (ok, wanted) in _KEY_TYPES.items():
        if key in entry and not ok(entry[key]):
            raise UserInputError(f"{where}: '{key}' must be {wanted}, got {short_repr(entry[key])}")


def jobs_from_entries(entries: Iterable[dict[str, Any]], defaults: dict[str, Any] | None = None) -> list[Job]:
    """Expand registry entries (one per model, a list of eps) into jobs, checked."""
    from ..threat import ThreatModel

    jobs: list[Job] = []
    for number, raw in enumerate(entries, start=1):
        if not isinstance(raw, dict):
            raise UserInputError(f"registry entry {number} must be a table, got {short_repr(raw)}")
        entry = {**(defaults or {}), **raw}
        where = f"registry entry {number} ({short_repr(entry.get('model', '?'))})"
        unknown = set(entry) - _ENTRY_KEYS
        if unknown:
            raise UserInputError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
        for key in ("model", "dataset", "norm", "n_examples"):
            if key not in entry:
                raise UserInputError(f"{where}: '{key}' is missing")
        _check_types(entry, where)
        n = entry["n_examples"]
        if entry["norm"].lower() == CORRUPTIONS_NORM:
            jobs.append(_corruption_job(entry, raw, where))
            continue
        if "corruptions" in entry:
            raise UserInputError(f"{where}: 'corruptions' needs norm = \"corruptions\"")
        if "eps" not in entry:
            raise UserInputError(f"{where}: 'eps' is missing")
        eps_values = entry["eps"] if isinstance(entry["eps"], list) else [entry["eps"]]
        if entry.get("mode", "cascade") not in MODES:
            raise UserInputError(f"{where}: mode must be one of {', '.join(MODES)}")
        for eps in eps_values:
            threat = ThreatModel(entry["norm"], float(eps), access=str(entry.get("access", "white-box")))
            jobs.append(Job(model=str(entry["model"]), dataset=str(entry["dataset"]),
                            split=str(entry.get("split", "test")), norm=threat.norm, eps=float(eps),
                            attacks=_specs(entry.get("attacks", []), "attacks", where),
                            certifiers=_specs(entry.get("certifiers", []), "certifiers", where),
                            n_examples=n, seed=int(entry.get("seed", 0)), mode=str(entry.get("mode", "cascade")),
                            access=threat.access, batch_size=int(entry.get("batch_size", 250))))
    keys = [j.key for j in jobs]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise UserInputError(f"the registry lists {dup[0]} more than once")
    return jobs


def _corruption_job(entry: dict[str, Any], raw: dict[str, Any], where: str) -> Job:
    """A ``norm = "corruptions"`` entry (``raw``: without the defaults): the listed corruptions at five
    severities, every one on every example (mode "individual", whatever the defaults' mode)."""
    from ..corruptions.evaluate import corruption_names

    for key, why in (("eps", "has no eps"), ("attacks", "runs no attacks"), ("certifiers", "runs no certifiers"),
                     ("access", "has no attacker")):
        if raw.get(key) not in (None, []):  # the defaults' attacks and certifiers are for the Lp entries
            raise UserInputError(f"{where}: '{key}' does not apply: the corruptions threat model {why}")
    if raw.get("mode", "individual") != "individual":
        raise UserInputError(f"{where}: the corruptions threat model scores every corruption on every example "
                             "(mode \"individual\")")
    names = entry.get("corruptions")
    if names is not None and (not isinstance(names, list) or not names):
        raise UserInputError(f"{where}: 'corruptions' must be a non-empty list of corruption names (leave it out for all)")
    try:
        names = corruption_names(names)
    except UserInputError as err:
        raise UserInputError(f"{where}: {err}") from None
    return Job(model=str(entry["model"]), dataset=str(entry["dataset"]), split=str(entry.get("split", "test")),
               norm=CORRUPTIONS_NORM, eps=0.0, attacks=tuple((name, ()) for name in names), certifiers=(),
               n_examples=int(entry["n_examples"]), seed=int(entry.get("seed", 0)), mode="individual",
               batch_size=int(entry.get("batch_size", 250)))


def load_registry(path: str | Path) -> list[Job]:
    """Jobs of a ``registry.toml`` (read with tomllib); refuses one that mixes protocols in a table."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text("utf-8"))
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise UserInputError(f"no leaderboard registry at {path}") from None
    except UnicodeDecodeError:
        raise UserInputError(f"{path}: not a TOML registry (not UTF-8 text)") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserInputError(f"{path}: not valid TOML ({exc})") from None
    unknown = sorted(set(data) - {"defaults", "entry"})
    if unknown:
        raise UserInputError(f"{path}: unknown top-level key(s) {', '.join(unknown)} (a registry holds [defaults] "
                             "and [[entry]] tables)")
    entries, defaults = data.get("entry", []), data.get("defaults", {})
    if not isinstance(defaults, dict):
        raise UserInputError(f"{path}: 'defaults' must be a table ([defaults]), got {short_repr(defaults)}")
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise UserInputError(f"{path}: 'entry' must be an array of tables ([[entry]]), got {short_repr(entries)}")
    jobs = jobs_from_entries(entries, defaults)
    check_one_protocol_per_table(jobs)
    return jobs


def check_one_protocol_per_table(jobs: Iterable[Job]) -> dict[tuple[str, str, float, str], dict[str, Any]]:
    """The protocol of each table; UserInputError when two jobs put different protocols in one table."""
    seen: dict[tuple[str, str, float, str], tuple[Job, dict[str, Any]]] = {}
    for job in jobs:
        proto = job_protocol(job)
        if job.table in seen and seen[job.table][1] != proto:
            other = seen[job.table][0]
            diff = sorted(k for k in proto if proto[k] != seen[job.table][1].get(k))
            raise UserInputError(f"refusing to mix protocols in table {job.dataset} "
                                 f"{threat_folder(job.norm, job.eps, job.access)}: "
                                 f"{other.model} and {job.model} differ in {', '.join(diff)}")
        seen.setdefault(job.table, (job, proto))
    return {table: proto for table, (_, proto) in seen.items()}


# --- protocols ------------------------------------------------------------------------------------
def _plugin_entries(pairs: Iterable[tuple[str, dict[str, Any]]],
                    prefixes: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """Protocol entries; a certifier run on a prefix of the examples carries its ``n_examples``."""
    out = []
    for name, config in pairs:
        entry = {"name": name, "config": json.loads(json.dumps(config, sort_keys=True))}
        if name in (prefixes or {}):
            entry[PREFIX_KEY] = int(prefixes[name])  # type: ignore[index]
        out.append(entry)
    return out


@lru_cache(maxsize=256)
def job_protocol_cached(job: Job) -> str:
    from ..evaluation.core import _config, _resolve

    if job.is_corruptions:
        from ..corruptions.evaluate import corruption_config

        attack_configs = [(name, corruption_config(name)) for name, _ in job.attacks]
        cert_configs: list[tuple[str, dict[str, Any]]] = []
    else:
        attack_configs = [(n, _config(a)) for n, a in _resolve(job.plugins("attack"), "attack")]
        cert_configs = [(n, _config(c)) for n, c in _resolve(job.plugins("certifier"), "certifier")]
    return json.dumps({
        "split": job.split, "n_examples": job.n_examples,
        "subset": {"start": 0, "stop": job.n_examples, "sha256": indices_sha256(range(job.n_examples))},
        "mode": job.mode, "seed": job.seed,
        "attacks": _plugin_entries(attack_configs),
        "certifiers": _plugin_entries(cert_configs, {} if job.is_corruptions else job.certifier_examples()),
    }, sort_keys=True)


def job_protocol(job: Job) -> dict[str, Any]:
    """The protocol a job's record must have: subset, mode, seed, attacks and certifiers with configs."""
    return json.loads(job_protocol_cached(job))


def record_protocol(record: dict[str, Any]) -> dict[str, Any]:
    """The same fields, read back from a leaderboard record."""
    ds = record["dataset"]
    return json.loads(json.dumps({
        "split": ds["split"], "n_examples": ds["n_examples"], "subset": ds["indices"],
        "mode": record["mode"], "seed": record["environment"]["seed"],
        "attacks": _plugin_entries((a["name"], a["config"]) for a in record["attacks"]),
        "certifiers": _plugin_entries(((c["name"], c["config"]) for c in record["certifiers"]),
                                      {c["name"]: c[PREFIX_KEY] for c in record["certifiers"]
                                       if c.get(PREFIX_KEY, ds["n_examples"]) < ds["n_examples"]}),
    }, sort_keys=True))


def protocol_differences(record: dict[str, Any], protocol: dict[str, Any]) -> list[str]:
    """Protocol fields in which ``record`` differs from ``protocol`` (empty: eligible)."""
    mine = record_protocol(record)
    return sorted(k for k in protocol if mine.get(k) != protocol[k])


# --- code fingerprints ----------------------------------------------------------------------------
def _module_file(name: str) -> Path | None:
    parts = name.split(".")
    if parts[0] not in PROJECT_PACKAGES:
        return None
    base = PROJECT_ROOT.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _top_level_imports(name: str, path: Path) -> set[str]:
    """Project modules imported at module level by ``name`` (imports inside functions are lazy: skipped)."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.parse(path.read_text("utf-8")).body:
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if node.module:  # `from . import patches` depends on the sibling, not on the package's __init__
                out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)  # `from pkg import module`
    return {m for m in out if _module_file(m) is not None}


def code_files(modules: Iterable[str]) -> dict[str, str]:
    """sha256 of each project source file that ``modules`` import, transitively at module level."""
    todo, seen = list(modules), set()
    while todo:
        name = todo.pop()
        if name in seen or _module_file(name) is None:
            continue
        seen.add(name)
        todo.extend(_top_level_imports(name, _module_file(name)))  # type: ignore[arg-type]
    out = {}
    for name in sorted(seen):
        path = _module_file(name)
        out[str(path.relative_to(PROJECT_ROOT))] = file_sha256(path)  # type: ignore[arg-type]
    return dict(sorted(out.items()))


def job_code_files(job: Job) -> dict[str, str]:
    """Source files a job's numbers depend on: its plug-ins' modules and the evaluator's."""
    modules = {type(p).__module__ for p in job.plugins("attack") + job.plugins("certifier")}
    if job.is_corruptions:
        modules.add("robustbench_lite.corruptions.evaluate")
    return code_files(sorted(modules) + list(EVALUATOR_MODULES))


def job_inputs(job: Job, weights_sha256: str | None, data_sha256: str) -> dict[str, Any]:
    """The record's ``inputs`` section: what a re-run would have to see change to give other numbers."""
    files = job_code_files(job)
    protocol = job_protocol(job)
    inputs = {"weights_sha256": weights_sha256, "data_sha256": data_sha256, "code_sha256": sha256_json(files),
              "code_files": files, "protocol_sha256": sha256_json(protocol), "registry_key": job.key}
    inputs["fingerprint"] = sha256_json({k: inputs[k] for k in
                                         ("weights_sha256", "data_sha256", "code_sha256", "protocol_sha256")})
    return copy.deepcopy(inputs)
