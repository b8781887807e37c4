"""Collect a sweep: run directories -> one table (one row per run and source).

A run directory is any directory holding `results.json` (written by `pipeline.train`) or
Hydra's `.hydra/config.yaml` (a run that started). Runs that failed or never finished
are rows too, with their status and reason, so a sweep with holes still collects.

Status column: ``completed`` (the planned run finished), ``stopped`` (a deliberate
``+trainer.max_steps`` stop short of the plan; resuming finishes it), ``failed`` (anything
else: an error, a non-finite loss, a preemption not yet resumed), ``unfinished`` or
``unreadable``; `reason` carries the run's own status line. results.json is strict JSON:
null metrics become NaN in the table.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

RUN_COLUMNS = ["run", "status", "reason", "experiment", "config_digest", "mixture", "num_parameters",
               "global_steps", "planned_steps", "global_batch_size", "world_size", "tokens_seen_total",
               "flops", "wall_time_s", "val_loss", "val_loss_macro"]
SOURCE_COLUMNS = ["source", "kind", "documents_train", "tokens_seen", "samples_seen", "epochs",
                  "final_prob", "final_loss_weight", "source_val_loss", "source_val_ppl", "source_val_chrf"]


def find_run_dirs(root: Path) -> list[Path]:
    """Directories under `root` (or root itself) that hold a run."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"sweep directory {str(root)!r} does not exist")
    found = {p.parent for p in root.rglob("results.json")}
    found |= {p.parent.parent for p in root.rglob(".hydra/config.yaml")}
    return sorted(found)


def mixture_label(mixture: dict[str, Any] | None) -> str:
    """Readable summary of a mixture config: 'Cooldown(tau_start=5.0,...) > Upweight(...)'."""
    if not mixture:
        return ""
    parts = []
    for stage in mixture.get("stages", []):
        name = str(stage.get("_target_", "?")).rsplit(".", 1)[-1]
        args = ",".join(f"{k}={v}" for k, v in stage.items() if k != "_target_" and v is not None)
        parts.append(f"{name}({args})")
    return " > ".join(parts)


def _overrides(run_dir: Path) -> dict[str, str]:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    try:
        items = yaml.safe_load(path.read_text()) or []
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: unreadable overrides ({error})") from error
    out = {}
    for item in items:
        key, _, value = str(item).lstrip("+~").partition("=")
        out[f"override.{key}"] = value
    return out


def _run_rows(run_dir: Path, root: Path) -> list[dict[str, Any]]:
    name = str(run_dir.relative_to(root)) if run_dir != root else run_dir.name
    base: dict[str, Any] = {"run": name, **_overrides(run_dir)}
    results_path = run_dir / "results.json"
    if not results_path.is_file():
        log_files = list(run_dir.glob("*.log"))
        tail = log_files[0].read_text(errors="replace").strip().splitlines()[-1:] if log_files else []
        return [{**base, "status": "unfinished", "reason": tail[0] if tail else "no results.json"}]
    try:
        record = json.loads(results_path.read_text())
    except json.JSONDecodeError as error:
        return [{**base, "status": "unreadable", "reason": f"results.json: {error}"}]
    metrics = {k: _number(v) for k, v in (record.get("metrics") or {}).items()}
    status = str(record.get("status", "unknown"))
    kind = "completed" if status == "completed" else "stopped" if status.startswith("stopped") else "failed"
    num_parameters = record.get("num_parameters")
    tokens = record.get("tokens_seen_total")
    base.update(
        status=kind,
        reason="" if status == "completed" else status,
        experiment=record.get("experiment"),
        config_digest=record.get("config_digest"),
        mixture=mixture_label(record.get("mixture")),
        num_parameters=num_parameters,
        global_steps=record.get("global_steps"),
        planned_steps=record.get("planned_steps"),
        global_batch_size=record.get("global_batch_size"),
        world_size=record.get("world_size"),
        tokens_seen_total=tokens,
        # Training compute C = 6 N D (forward + backward), D = target tokens seen.
        flops=6.0 * num_parameters * tokens if num_parameters and tokens else math.nan,
        wall_time_s=record.get("wall_time_s"),
        val_loss=metrics.get("val/loss", math.nan),
        val_loss_macro=metrics.get("val/loss_macro", math.nan),
    )
    sources = record.get("sources") or {}
    if not sources:
        return [base]
    rows = []
    for source, info in sources.items():
        rows.append({
            **base, "source": source, "kind": info.get("kind"),
            "documents_train": info.get("documents_train"), "tokens_seen": info.get("tokens_seen"),
            "samples_seen": info.get("samples_seen"), "epochs": info.get("epochs"),
            "final_prob": info.get("final_prob"), "final_loss_weight": info.get("final_loss_weight"),
            "source_val_loss": _number(info.get("val_loss")), "source_val_ppl": _number(info.get("val_ppl")),
            "source_val_chrf": _number(info.get("val_chrf")),
        })
    return rows


def _number(value: Any) -> float:
    """A metric from results.json as a float: null (a non-finite or missing value) is NaN."""
    if value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def collect(root: Path) -> pd.DataFrame:
    """One row per (run, source); failed and unfinished runs get one row with a reason."""
    root = Path(root)
    rows = [row for run_dir in find_run_dirs(root) for row in _run_rows(run_dir, root)]
    frame = pd.DataFrame(rows)
    for column in RUN_COLUMNS + SOURCE_COLUMNS:
        if column not in frame:
            frame[column] = pd.NA
    extra = [c for c in frame.columns if c not in RUN_COLUMNS + SOURCE_COLUMNS]
    return frame[RUN_COLUMNS + SOURCE_COLUMNS + sorted(extra)]


def group_means(frame: pd.DataFrame, groups: dict[str, list[str]], value: str = "source_val_loss") -> pd.DataFrame:
    """Per completed run, the unweighted mean of `value` over each group's sources.

    One row per run (index: run; columns: the run's `override.*` parameters, `mixture`, then
    one column per group). Every source counts once, whatever its size, so a group's mean
    is the macro average a per-language comparison needs (e.g. high- vs low-resource).

    Raises:
        ValueError: no completed run, an empty group, or a source no completed run has.
    """
    completed = frame[frame["status"] == "completed"]
    if completed.empty:
        raise ValueError("no completed run to average")
    known = set(completed["source"].dropna())
    for name, sources in groups.items():
        if not sources:
            raise ValueError(f"group {name!r} has no sources")
        unknown = sorted(set(sources) - known)
        if unknown:
            raise ValueError(f"group {name!r}: source(s) {unknown} not in the sweep; known: {sorted(known)}")
    params = [c for c in completed.columns if c.startswith("override.")] + ["mixture"]
    table = completed.groupby("run")[params].first()
    for name, sources in groups.items():
        rows = completed[completed["source"].isin(sources)]
        table[name] = rows.groupby("run")[value].mean()
    return table


def summarize(frame: pd.DataFrame) -> str:
    runs = frame.drop_duplicates("run")
    counts = runs["status"].value_counts().to_dict()
    lines = [f"{len(runs)} run(s): " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))]
    for _, row in runs[runs["status"] != "completed"].iterrows():
        lines.append(f"  {row['run']}: {row['status']}: {row['reason']}")
    return "\n".join(lines)
