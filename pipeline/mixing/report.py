"""Pre-flight mixture report: what a planned stream will do, before any training.

Pure: it evaluates the sampler's schedule (`python -m pipeline.report` composes the config,
prepares the data and prints it).

Per source and per schedule phase: size, sampling probability and loss weight at the
phase's first and last step, expected draws in the phase, and cumulative epochs at its end;
then the whole run, with flags for sources that round to zero draws or exceed the epoch
limit. Training logs the same table before its first step.

An adaptive schedule (online mixing, `pipeline.mixing.schedule.OnlineSchedule`) is reported
by its initial plan: the controller's plan before any observation, held over the run (the
prior's own schedule, e.g. a Cooldown, still moves), and the description says the
probabilities adapt, from which step and how often.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import pairwise
from typing import Protocol

import numpy as np

from pipeline.mixing.schedule import MixtureSchedule, OnlineSchedule


class PlannedStream(Protocol):
    """What the report reads of a sampler (`pipeline.sampling.sampler.MixtureSampler`)."""

    schedule: MixtureSchedule
    sources: tuple[str, ...]
    num_documents: np.ndarray  # (S,)
    global_batch_size: int
    mode: str
    seed: int

    def cumulative_targets(self, step: int) -> np.ndarray:
        """(S,) expected draws per source over steps [0, step)."""


@dataclass
class PhaseReport:
    """One schedule phase: steps [first_step, end_step)."""

    first_step: int
    end_step: int
    probs_start: np.ndarray  # (S,)
    probs_end: np.ndarray  # (S,)
    weights_start: np.ndarray  # (S,)
    weights_end: np.ndarray  # (S,)
    expected_draws: np.ndarray  # (S,) in this phase
    epochs_at_end: np.ndarray  # (S,) cumulative passes at end_step


@dataclass
class MixtureReport:
    sources: tuple[str, ...]
    num_documents: np.ndarray  # (S,)
    sizes: np.ndarray  # (S,) in the mixture's size unit
    size_unit: str
    total_steps: int
    global_batch_size: int
    phases: list[PhaseReport]
    expected_draws: np.ndarray  # (S,) whole run
    epochs: np.ndarray  # (S,) whole run
    max_epochs: float
    description: str
    flags: dict[str, list[str]] = field(default_factory=dict)
    draw_unit: str = "documents"  # what a draw is: documents, or windows (loader.unit=window)

    def rows(self) -> list[dict]:
        """Whole-run rows for logging as a table (one dict per source)."""
        return [
            {
                "source": name,
                "documents": int(self.num_documents[i]),
                "size": float(self.sizes[i]),
                "prob_start": float(self.phases[0].probs_start[i]),
                "prob_end": float(self.phases[-1].probs_end[i]),
                "loss_weight_start": float(self.phases[0].weights_start[i]),
                "loss_weight_end": float(self.phases[-1].weights_end[i]),
                "expected_draws": float(self.expected_draws[i]),
                "epochs": float(self.epochs[i]),
                "flags": ",".join(self.flags.get(name, [])),
            }
            for i, name in enumerate(self.sources)
        ]


def build_report(sampler: PlannedStream, sizes: dict[str, float] | None = None,
                 size_unit: str = "documents", max_epochs: float = 10.0,
                 draw_unit: str = "documents") -> MixtureReport:
    """Evaluate the sampler's schedule at every phase boundary (no stream is generated).
    `draw_unit` names what one draw is (the report's "docs" column and epochs count them)."""
    schedule = sampler.schedule
    adaptive = ""
    if isinstance(schedule, OnlineSchedule):
        bandit = schedule.bandit
        adaptive = (f"; ADAPTIVE: the probabilities below are the initial plan; the online controller "
                    f"re-decides them every {bandit.update_every} steps from the training losses, first "
                    f"applied at step {(1 + bandit.lag_windows) * bandit.update_every} "
                    f"(lag {bandit.lag_windows} window(s)); draws and epochs assume no update")
        schedule = MixtureSchedule(schedule.stage, schedule.sizes, schedule.total_steps, bandit.update_every)
        sampler = _Planned(schedule, sampler)
    total = schedule.total_steps
    edges = sorted({0, total, *(min(total, max(0, round(b * total))) for b in schedule.stage.breakpoints())})
    phases = []
    for first, end in pairwise(edges):
        if end <= first:
            continue
        start_plan, end_plan = schedule.plan_at(first), schedule.plan_at(end - 1)
        draws = sampler.cumulative_targets(end) - sampler.cumulative_targets(first)
        phases.append(PhaseReport(
            first, end, start_plan.sample_probs, end_plan.sample_probs,
            start_plan.loss_weights, end_plan.loss_weights, draws,
            sampler.cumulative_targets(end) / sampler.num_documents,
        ))
    expected = sampler.cumulative_targets(total)
    epochs = expected / sampler.num_documents
    flags: dict[str, list[str]] = {}
    for i, name in enumerate(sampler.sources):
        if expected[i] < 0.5:
            flags.setdefault(name, []).append("ZERO")
        if epochs[i] > max_epochs:
            flags.setdefault(name, []).append(f"EPOCHS>{max_epochs:g}")
    size_array = np.array([float((sizes or {}).get(n, d)) for n, d in zip(sampler.sources, sampler.num_documents, strict=True)])
    return MixtureReport(
        sampler.sources, sampler.num_documents, size_array, size_unit, total,
        sampler.global_batch_size, phases, expected, epochs, max_epochs,
        f"{schedule.stage!r}, sampler={sampler.mode}, seed={sampler.seed}{adaptive}", flags, draw_unit,
    )


class _Planned:
    """A stand-in sampler over a static schedule (the initial plan of an adaptive one)."""

    def __init__(self, schedule: MixtureSchedule, sampler: PlannedStream):
        self.schedule = schedule
        self.sources, self.num_documents = sampler.sources, sampler.num_documents
        self.global_batch_size, self.mode, self.seed = sampler.global_batch_size, sampler.mode, sampler.seed

    def cumulative_targets(self, step: int) -> np.ndarray:
        boundaries = self.schedule.boundaries
        lengths = np.clip(np.minimum(step, np.append(boundaries[1:], max(step, boundaries[-1]))) - boundaries, 0, None)
        return (self.schedule.probs * lengths[:, None]).sum(0) * self.global_batch_size


def format_report(report: MixtureReport) -> str:
    """Plain-text tables (ASCII) of the report."""
    names = report.sources
    width = max(8, *(len(n) for n in names))
    lines = [
        f"Mixture: {len(names)} sources, {report.total_steps} steps x {report.global_batch_size} "
        f"= {report.total_steps * report.global_batch_size:,} draws",
        f"  {report.description}",
    ]
    for number, phase in enumerate(report.phases, 1):
        lines.append("")
        lines.append(f"Phase {number}: steps [{phase.first_step}, {phase.end_step}) = progress "
                     f"[{phase.first_step / report.total_steps:.2f}, {phase.end_step / report.total_steps:.2f})")
        lines.append(f"{'source':<{width}} {'p@start':>8} {'p@end':>8} {'w@start':>8} {'w@end':>8} "
                     f"{'draws':>10} {'epochs':>8}")
        for i, name in enumerate(names):
            lines.append(
                f"{name:<{width}} {phase.probs_start[i]:8.4f} {phase.probs_end[i]:8.4f} "
                f"{phase.weights_start[i]:8.3f} {phase.weights_end[i]:8.3f} "
                f"{phase.expected_draws[i]:10.1f} {phase.epochs_at_end[i]:8.2f}"
            )
    lines.append("")
    lines.append(f"Whole run (sizes in {report.size_unit}; epochs count {report.draw_unit}):")
    column = "docs" if report.draw_unit == "documents" else report.draw_unit
    lines.append(f"{'source':<{width}} {column:>9} {'size':>11} {'draws':>10} {'epochs':>8}  flags")
    for i, name in enumerate(names):
        lines.append(
            f"{name:<{width}} {report.num_documents[i]:9d} {report.sizes[i]:11.0f} "
            f"{report.expected_draws[i]:10.1f} {report.epochs[i]:8.2f}  {','.join(report.flags.get(name, []))}"
        )
    zero = [n for n, f in report.flags.items() if "ZERO" in f]
    over = [n for n, f in report.flags.items() if any(x.startswith("EPOCHS") for x in f)]
    lines.append("")
    lines.append(f"Flags: {len(zero)} source(s) round to zero draws{': ' + ', '.join(zero) if zero else ''}; "
                 f"{len(over)} exceed {report.max_epochs:g} epochs{': ' + ', '.join(over) if over else ''}.")
    return "\n".join(lines)

