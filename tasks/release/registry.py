"""The model registry: numbered versions, a `production` alias, and the champion/challenger gate.

Layout (`<workspace>/registry/<name>/`):
  versions/<n>/      model/ (the export, hardlinked), metrics.json, lineage.json, version.json, gate.json
  aliases.json       {"production": n, "production_history": [...], "updated_at": ...}, replaced atomically
  history.jsonl      one JSON line per event (register, promote, reject, rollback)
  .lock              a filelock held while a version number is taken or the alias moves

A version folder is built in a temporary sibling and renamed (atomic_dir), and only then may the alias
point at it: the registry never names a half-written model. Everything here is plain file work (no torch).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from tasks.config import RunConfig
from tasks.evaluation.metrics import higher_is_better  # the evaluation stage's notion of a metric's direction
from tasks.files import atomic_dir, write_json
from tasks.records import RegistryResult
from tasks.release.provenance import code_version
from tasks.workspace import RegistryError, Workspace, read_facts

REQUIRED_EXPORT_FILES = ("config.json", "lineage.json")
__all__ = [
    "RegistryError",
    "RegistryResult",
    "compare",
    "history",
    "list_models",
    "list_versions",
    "promote",
    "register_version",
    "rollback",
    "show_version",
]


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _lock(root: Path, timeout: float = 600):
    from filelock import FileLock

    root.mkdir(parents=True, exist_ok=True)
    return FileLock(str(root / ".lock"), timeout=timeout)


def _log(root: Path, event: dict) -> None:
    """Append one event line (called with the lock held)."""
    with open(root / "history.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"at": _now(), **event}, default=str) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _set_production(root: Path, version: int | None, history: list[int]) -> None:
    write_json(root / "aliases.json", {"production": version, "production_history": history, "updated_at": _now()})


def _link_tree(src: Path, dst: Path) -> None:
    """Hardlink every file (exports are immutable); copy where links are impossible (another device)."""
    for f in sorted(src.rglob("*")):
        target = dst / f.relative_to(src)
        if f.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(f, target)
        except OSError:
            shutil.copy2(f, target)


def compare(new: dict, champion: dict | None, min_delta: float, promote_if_not_comparable: bool = False) -> dict:
    """The gate: does `new` ({version?, primary_metric, primary_value, test_set_fingerprint}) beat `champion`?"""
    rec: dict[str, Any] = {
        "primary_metric": new["primary_metric"],
        "new_value": new["primary_value"],
        "test_set_fingerprint": new.get("test_set_fingerprint"),
        "min_delta": min_delta,
        "higher_is_better": higher_is_better(new["primary_metric"]),
    }
    if champion is None:
        return {
            **rec,
            "comparable": True,
            "champion_version": None,
            "decision": "promote",
            "reason": "first version of this model: promoted",
        }
    rec.update(
        champion_version=champion.get("version"),
        champion_value=champion.get("primary_value"),
        champion_test_set_fingerprint=champion.get("test_set_fingerprint"),
    )
    why = None
    if champion.get("primary_metric") != new["primary_metric"]:
        why = f"primary metrics differ ({new['primary_metric']} vs production's {champion.get('primary_metric')})"
    elif not new.get("test_set_fingerprint") or new.get("test_set_fingerprint") != champion.get("test_set_fingerprint"):
        why = "the test sets differ (test-set fingerprints do not match)"
    if why:
        decision = "promote" if promote_if_not_comparable else "keep"
        return {
            **rec,
            "comparable": False,
            "delta": None,
            "decision": decision,
            "reason": f"not comparable: {why}; "
            + (
                "promoted (registry.promote_if_not_comparable)" if promote_if_not_comparable else "production unchanged"
            ),
        }
    sign = 1.0 if rec["higher_is_better"] else -1.0
    delta = sign * (float(new["primary_value"]) - float(champion["primary_value"]))
    beats = delta > 0 and delta >= min_delta
    return {
        **rec,
        "comparable": True,
        "delta": delta,
        "decision": "promote" if beats else "keep",
        "reason": (
            f"{new['primary_metric']} improves by {delta:.4g} (>= min_delta {min_delta:g}): promoted"
            if beats
            else f"{new['primary_metric']} changes by {delta:+.4g}, needs > 0 and >= min_delta {min_delta:g}: "
            f"production stays at version {champion.get('version')}"
        ),
    }


def baseline_checks(new: dict, baselines: dict, must_beat: list[str], min_delta: float) -> list[dict]:
    """One check per baseline in `must_beat`: the new version must beat it on the primary metric by min_delta
    (strictly: a tie is not a win). A baseline that was not scored fails its check (it cannot be shown beaten)."""
    metric, value = new["primary_metric"], float(new["primary_value"])
    sign = 1.0 if higher_is_better(metric) else -1.0
    checks = []
    for name in must_beat:
        base = ((baselines.get(name) or {}).get("metrics") or {}).get(metric)
        if not isinstance(base, (int, float)):
            checks.append(
                {
                    "check": f"beats {name}",
                    "passed": False,
                    "baseline_value": None,
                    "delta": None,
                    "why": f"the {name} baseline was not scored on {metric} (evaluation.baselines is off?); set "
                    "registry.must_beat to the baselines to check, or [] to skip the check",
                }
            )
            continue
        delta = sign * (value - float(base))
        passed = delta > 0 and delta >= min_delta
        why = f"{metric} {value:.4f} vs {name} {float(base):.4f} ({delta:+.4f})" + (
            "" if passed else (" - a tie is not a win" if delta == 0 else f", needs > 0 and >= min_delta {min_delta:g}")
        )
        checks.append(
            {"check": f"beats {name}", "passed": passed, "baseline_value": float(base), "delta": delta, "why": why}
        )
    return checks


def must_beat(rcfg, task: str | None) -> list[str]:
    """registry.must_beat, or the task's own baselines: the base model for sft, majority and TF-IDF otherwise."""
    if rcfg.must_beat is not None:
        return list(rcfg.must_beat)
    return ["base"] if task == "sft" else ["majority", "tfidf"]


def decide(new: dict, champion: dict | None, baselines: dict, rcfg, task: str | None = None) -> dict:
    """The whole gate: beat the required baselines, then production (when there is one and it is comparable)."""
    comparison = compare(new, champion, rcfg.min_delta, rcfg.promote_if_not_comparable)
    checks = baseline_checks(new, baselines, must_beat(rcfg, task), rcfg.min_delta)
    failed = [c for c in checks if not c["passed"]]
    comparison["baseline_checks"] = checks
    if failed:
        comparison["decision"] = "keep"
        comparison["reason"] = (
            "failed the baseline check: "
            + "; ".join(f"{c['check']}: {c['why']}" for c in failed)
            + ("; production unchanged" if champion else "; not promoted")
        )
    return comparison


def _check_inputs(export_dir: Path, eval_dir: Path) -> tuple[dict, dict]:
    missing = [f for f in REQUIRED_EXPORT_FILES if not (export_dir / f).is_file()]
    if not list(export_dir.glob("*.safetensors")):
        missing.append("*.safetensors")
    if missing:
        raise RegistryError(f"export {export_dir} is incomplete (missing {', '.join(missing)}); nothing registered")
    if not (eval_dir / "metrics.json").is_file():
        raise RegistryError(f"evaluation {eval_dir} has no metrics.json; nothing registered")
    lineage = read_facts(export_dir / "lineage.json", "export")
    metrics = read_facts(eval_dir / "metrics.json", "evaluation")
    primary = metrics.get("primary_metric")
    value = (metrics.get("metrics") or {}).get(primary)
    if not isinstance(value, (int, float)) or value != value:
        raise RegistryError(
            f"{eval_dir / 'metrics.json'}: primary metric {primary!r} has no numeric value; nothing registered"
        )
    return lineage, metrics


def _existing(ws: Workspace, name: str, lineage: dict, evald: Path) -> RegistryResult | None:
    """A retry or re-run: the same export (and evaluation) is one version, not two."""
    champ = ws.aliases(name).get("production")
    for n in ws.version_numbers(name) if lineage.get("export_key") else []:
        facts = ws.version_facts(name, n)
        if facts.get("export_key") == lineage["export_key"] and facts.get("eval_dir") == ws.relative(evald):
            gate = read_facts(ws.version_dir(name, n) / "gate.json", "registered version")
            return RegistryResult(
                name, n, str(ws.version_dir(name, n)), champ == n, {**gate, "already_registered": True}
            )
    return None


def _write_version(
    ws: Workspace, final: Path, export: Path, evald: Path, lineage: dict, new: dict, comparison: dict, t0: float
) -> None:
    name, version = comparison["name"], comparison["version"]
    with atomic_dir(final) as tmp:
        _link_tree(export, tmp / "model")
        shutil.copy2(evald / "metrics.json", tmp / "metrics.json")
        write_json(
            tmp / "lineage.json",
            {
                **lineage,
                "registry": {
                    "name": name,
                    "version": version,
                    "registered_at": _now(),
                    "export_dir": ws.relative(export),
                    "eval_dir": ws.relative(evald),
                    "code_version": code_version(),
                },
                "timings": {**(lineage.get("timings") or {}), "register_s": round(time.perf_counter() - t0, 3)},
            },
        )
        write_json(tmp / "gate.json", comparison)
        write_json(
            tmp / "version.json",
            {
                "name": name,
                "version": version,
                "created_at": _now(),
                **new,
                "method": lineage.get("method"),
                "task": lineage.get("task"),
                "dataset_fingerprint": lineage.get("dataset_fingerprint"),
                "export_key": lineage.get("export_key"),
                "export_dir": ws.relative(export),
                "eval_dir": ws.relative(evald),
            },
        )


def register_version(cfg: RunConfig, export_dir: str | Path, eval_dir: str | Path) -> RegistryResult:
    """Add the export as the next version of `registry.name`; promote it when it beats production."""
    t0 = time.perf_counter()
    ws, export, evald = Workspace.at(cfg.workspace), Path(export_dir), Path(eval_dir)
    lineage, metrics = _check_inputs(export, evald)
    rcfg = cfg.registry
    root = ws.model_root(rcfg.name)
    primary = metrics["primary_metric"]
    new = {
        "primary_metric": primary,
        "primary_value": float(metrics["metrics"][primary]),
        "test_set_fingerprint": lineage.get("test_set_fingerprint"),
    }
    with _lock(root, rcfg.lock_timeout_s):
        done = _existing(ws, rcfg.name, lineage, evald)
        if done is not None:
            return done
        numbers, aliases = ws.version_numbers(rcfg.name), ws.aliases(rcfg.name)
        champ = aliases.get("production")
        version = (numbers[-1] if numbers else 0) + 1
        champion = ws.version_facts(rcfg.name, champ) if champ else None
        comparison = decide(new, champion, metrics.get("baselines") or {}, rcfg, metrics.get("task"))
        promoted = comparison["decision"] == "promote" and rcfg.promote
        if comparison["decision"] == "promote" and not rcfg.promote:
            comparison["reason"] += " (but registry.promote is false: not promoted)"
        comparison.update(name=rcfg.name, version=version, promoted=promoted, decided_at=_now())
        final = ws.version_dir(rcfg.name, version)
        _write_version(ws, final, export, evald, lineage, new, comparison, t0)
        _log(root, {"event": "register", "version": version, **{k: comparison[k] for k in ("decision", "reason")}})
        if promoted:
            _set_production(root, version, list(aliases.get("production_history") or []) + [version])
            _log(root, {"event": "promote", "version": version, "previous": champ, "reason": "gate"})
    return RegistryResult(rcfg.name, version, str(final), promoted, comparison)


# ---- reading and moving the alias -----------------------------------------------------------------


def list_models(workspace: str | Path) -> list[str]:
    return Workspace.at(workspace).model_names()


def list_versions(workspace: str | Path, name: str) -> list[dict]:
    """Every version's facts, with `production: bool` and the gate decision."""
    ws = Workspace.at(workspace)
    ws.registered_root(name)
    prod = ws.aliases(name).get("production")
    out = []
    for n in ws.version_numbers(name):
        facts = ws.version_facts(name, n)
        gate = read_facts(ws.version_dir(name, n) / "gate.json", "registered version")
        out.append(
            {**facts, "production": n == prod, "gate": gate.get("decision"), "promoted_by_gate": gate.get("promoted")}
        )
    return out


def show_version(workspace: str | Path, name: str, version: int | None = None) -> dict:
    """version.json + gate.json + test metrics of one version (default: production)."""
    ws = Workspace.at(workspace)
    ws.registered_root(name)
    aliases = ws.aliases(name)
    v = version if version is not None else aliases.get("production")
    if v is None:
        raise RegistryError(f"model {name!r} has no production version; pass a version: {ws.version_numbers(name)}")
    vdir = ws.version_dir(name, v)
    if not (vdir / "version.json").is_file():
        raise RegistryError(
            f"model {name!r} has no version {v}; versions: {', '.join(map(str, ws.version_numbers(name)))}"
        )
    metrics = read_facts(vdir / "metrics.json", "registered version")
    return {
        **ws.version_facts(name, v),
        "path": str(vdir),
        "production": v == aliases.get("production"),
        "gate": read_facts(vdir / "gate.json", "registered version"),
        "metrics": metrics.get("metrics", {}),
        "baselines": metrics.get("baselines", {}),
    }


def promote(workspace: str | Path, name: str, version: int, reason: str = "manual", timeout: float = 600) -> dict:
    """Force `version` to production (no gate); recorded in the history."""
    ws = Workspace.at(workspace)
    root = ws.registered_root(name)
    with _lock(root, timeout):
        if version not in ws.version_numbers(name):
            raise RegistryError(
                f"model {name!r} has no version {version}; versions: {', '.join(map(str, ws.version_numbers(name)))}"
            )
        aliases = ws.aliases(name)
        previous = aliases.get("production")
        history = list(aliases.get("production_history") or [])
        if previous != version:
            history.append(version)
            _set_production(root, version, history)
        _log(root, {"event": "promote", "version": version, "previous": previous, "reason": reason})
    return {"name": name, "production": version, "previous": previous}


def rollback(workspace: str | Path, name: str, timeout: float = 600) -> dict:
    """Return production to the version that held it before the current one."""
    ws = Workspace.at(workspace)
    root = ws.registered_root(name)
    with _lock(root, timeout):
        aliases = ws.aliases(name)
        history = list(aliases.get("production_history") or [])
        current = aliases.get("production")
        if len(history) < 2:
            raise RegistryError(
                f"model {name!r} has no earlier production version to roll back to "
                f"(production: {current}, history: {history})"
            )
        history.pop()
        target = history[-1]
        _set_production(root, target, history)
        _log(root, {"event": "rollback", "version": target, "previous": current})
    return {"name": name, "production": target, "previous": current}


def history(workspace: str | Path, name: str) -> list[dict]:
    """The event log, oldest first (a line cut short by a crash is skipped)."""
    p = Workspace.at(workspace).registered_root(name) / "history.jsonl"
    events = []
    for line in p.read_text(encoding="utf-8").splitlines() if p.exists() else []:
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events
