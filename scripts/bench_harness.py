"""What every benchmark in scripts/ shares: timing, statistics, ratios, goals, tables, JSON.

The scripts run as ``python scripts/bench_x.py``, so this folder is ``sys.path[0]`` and
``import bench_harness`` needs no path set-up. Standard library only: `bench_kernels.py`'s
driver also runs in a throwaway venv (the CCE baseline) where the project does not import.

    stats = measure(step, repeats=5, warmup=1)       # Stats: median, min, max, iqr, samples
    value = ratio(ours.median, baseline.median)      # None when the baseline is missing or 0
    goals = [Goal("fit", "fit < 5 s", seconds, 5.0, "<", unit="s")]
    print(render_goals(goals))                       # "goals:" then PASS / MISS per goal
    print(table(["case", "median s"], rows))         # or markdown=True
    write_json(path, payload)                        # strict JSON: NaN and inf become null
"""

from __future__ import annotations

import json
import math
import numbers
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = REPO / ".cache" / "mixpipe"


# -- statistics and timing --------------------------------------------------------------------


@dataclass(frozen=True)
class Stats:
    """Summary of repeated measurements (the median is the figure the tables report)."""

    samples: tuple[float, ...]

    @property
    def median(self) -> float:
        return float(statistics.median(self.samples)) if self.samples else math.nan

    @property
    def min(self) -> float:
        return float(min(self.samples)) if self.samples else math.nan

    @property
    def max(self) -> float:
        return float(max(self.samples)) if self.samples else math.nan

    @property
    def iqr(self) -> float:
        """Interquartile range (0 for one sample, NaN for none)."""
        if len(self.samples) < 2:
            return 0.0 if self.samples else math.nan
        q1, _, q3 = statistics.quantiles(self.samples, n=4, method="inclusive")
        return float(q3 - q1)

    def as_json(self) -> dict[str, Any]:
        return {"median": self.median, "min": self.min, "max": self.max, "iqr": self.iqr,
                "samples": [float(s) for s in self.samples]}


def summarize(samples: Iterable[float]) -> Stats:
    """Stats of already collected samples."""
    return Stats(tuple(float(s) for s in samples))


def measure(fn: Callable[[], Any], *, repeats: int = 1, warmup: int = 0,
            sync: Callable[[], Any] | None = None) -> Stats:
    """Wall seconds of `fn()`: `warmup` untimed calls, then `repeats` timed ones.

    `sync` (e.g. ``torch.cuda.synchronize``) runs inside each timed window, after `fn`.
    `fn`'s return value is dropped right after its window closes (freeing it is not timed),
    so one call's outputs (a loss's gradients) are gone before the next call starts:
    peak-memory figures taken around `measure` count one call's memory, not two.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"measure needs repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    for _ in range(warmup):
        result = fn()
        if sync is not None:
            sync()
        del result
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        if sync is not None:
            sync()
        samples.append(time.perf_counter() - started)
        del result
    return Stats(tuple(samples))


def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """(fn(*args, **kwargs), wall seconds) of one call, for measurements that keep the result."""
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - started


@dataclass
class Series:
    """One named quantity measured repeatedly by hand (several clocks per repeat, rates)."""

    key: str
    label: str
    unit: str
    samples: list[float] = field(default_factory=list)
    note: str = ""

    @property
    def stats(self) -> Stats:
        return summarize(self.samples)

    @property
    def median(self) -> float:
        return self.stats.median

    def as_json(self) -> dict[str, Any]:
        return {"label": self.label, "unit": self.unit, **self.stats.as_json(), "note": self.note}


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when either is missing or NaN or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    if math.isnan(numerator) or math.isnan(denominator):
        return None
    return numerator / denominator


# -- goals ------------------------------------------------------------------------------------

_COMPARE = {"<": lambda v, t: v < t, "<=": lambda v, t: v <= t,
            ">": lambda v, t: v > t, ">=": lambda v, t: v >= t}


@dataclass(frozen=True)
class Goal:
    """A target a measured value must meet: ``value <direction> target``.

    key: stable name in the JSON; label: what the table prints (the target in words);
    direction: one of ``<``, ``<=``, ``>``, ``>=``; unit: ``x`` for ratios. A missing
    (None or NaN) value misses its goal.
    """

    key: str
    label: str
    value: float | None
    target: float
    direction: str
    unit: str = ""
    note: str = ""

    def __post_init__(self) -> None:
        if self.direction not in _COMPARE:
            raise ValueError(f"goal {self.key!r}: direction must be one of {sorted(_COMPARE)}, "
                             f"got {self.direction!r}")

    @property
    def passed(self) -> bool:
        if self.value is None or math.isnan(self.value):
            return False
        return bool(_COMPARE[self.direction](self.value, self.target))

    @property
    def verdict(self) -> str:
        return "PASS" if self.passed else "MISS"

    def line(self) -> str:
        """``PASS  label: value unit (note)``."""
        note = f" ({self.note})" if self.note else ""
        return f"{self.verdict}  {self.label}: {fmt_value(self.value, self.unit)}{note}"

    def as_json(self) -> dict[str, Any]:
        return {"key": self.key, "label": self.label, "value": self.value, "unit": self.unit,
                "target": self.target, "direction": self.direction, "pass": self.passed,
                "note": self.note}


def render_goals(goals: Sequence[Goal], title: str = "goals:") -> str:
    """The goals block: one PASS / MISS line each, then how many were met."""
    lines = [title, *(f"  {goal.line()}" for goal in goals)]
    lines.append(f"  {sum(goal.passed for goal in goals)} of {len(goals)} goals met")
    return "\n".join(lines)


# -- formatting and tables --------------------------------------------------------------------


def fmt(value: float | None, unit: str = "") -> str:
    """A number as the tables print it: seconds and ms to ~3 figures, big values with commas."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if unit in ("ms", "s"):
        return f"{value:,.1f}" if value >= 10 else f"{value:,.2f}" if value >= 1 else f"{value:.3f}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def fmt_ratio(value: float | None, spec: str = ".2f") -> str:
    """A ratio as ``2.50x`` (``n/a`` when it could not be computed)."""
    return "n/a" if value is None or math.isnan(value) else f"{value:{spec}}x"


def fmt_value(value: float | None, unit: str = "") -> str:
    """`fmt` with its unit: ratios (unit ``x``) as `fmt_ratio`, other units after a blank."""
    if unit == "x":
        return fmt_ratio(value)
    return f"{fmt(value, unit)} {unit}".rstrip()


def _cell(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return str(value)
    if spec:
        return format(value, spec)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return fmt(value)
    return str(value)


def table(columns: Sequence[str], rows: Iterable[Sequence[Any]], *,
          formats: Mapping[str, str] | None = None, align: str | None = None,
          markdown: bool = False) -> str:
    """Rows under their column names, as plain aligned text or a markdown table.

    formats: format spec per column name for its numbers (``{"save s": ".3f"}``); otherwise
    ints get thousands separators and floats `fmt`. None prints ``-``, strings print as they
    are. align: ``<`` or ``>`` per column (``"<>>"``); by default columns whose cells are all
    numbers (or None) are right-aligned, the others left-aligned.
    """
    formats = formats or {}
    rows = [list(row) for row in rows]
    for row in rows:
        if len(row) != len(columns):
            raise ValueError(f"row {row!r} has {len(row)} cells for {len(columns)} columns")
    if align is not None:
        if len(align) != len(columns) or set(align) - {"<", ">"}:
            raise ValueError(f"align must give '<' or '>' for each of {len(columns)} columns, got {align!r}")
        numeric = [a == ">" for a in align]
    else:
        numeric = [all(row[i] is None or (isinstance(row[i], int | float) and not isinstance(row[i], bool))
                       for row in rows) for i in range(len(columns))]
    cells = [[_cell(value, formats.get(name, "")) for name, value in zip(columns, row, strict=True)]
             for row in rows]
    if markdown:
        rule = ["---:" if right else "---" for right in numeric]
        lines = [list(columns), rule, *cells]
        return "\n".join("| " + " | ".join(line) + " |" for line in lines)
    widths = [max(len(str(name)), *(len(row[i]) for row in cells)) for i, name in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        parts = [value.rjust(width) if right else value.ljust(width)
                 for value, width, right in zip(values, widths, numeric, strict=True)]
        return "  ".join(parts).rstrip()

    return "\n".join([line(list(columns)), *(line(row) for row in cells)])


# -- machine ----------------------------------------------------------------------------------


def load_average() -> str:
    """The 1, 5 and 15 minute load averages (on a shared machine they move absolute times)."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unavailable"


def machine(**versions: str) -> dict[str, Any]:
    """Where and when a benchmark ran: Python, OS, architecture, CPUs, load; plus `versions`
    (``torch=torch.__version__``, ...)."""
    return {"python": platform.python_version(), "executable": sys.executable,
            "platform": platform.platform(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "load_average": load_average(), "when": time.strftime("%Y-%m-%d %H:%M"), **versions}


def describe_machine(info: Mapping[str, Any]) -> str:
    """One line of `machine()`: ``Python 3.11.7, torch 2.13.0, 2 CPUs (x86_64), 2026-...``."""
    known = {"python", "executable", "platform", "machine", "cpus", "load_average", "when"}
    versions = "".join(f", {name} {version}" for name, version in info.items() if name not in known)
    return (f"Python {info['python']}{versions}, {info['cpus']} CPUs ({info['machine']}), "
            f"load average {info['load_average']}, {info['when']}")


# -- peak memory ------------------------------------------------------------------------------


def _status_kib(name: str) -> int | None:
    """A field of /proc/self/status in KiB (VmRSS, VmHWM), or None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakRss:
    """Extra peak resident memory of this process over a stretch of code, in bytes.

    torch's CPU allocations are invisible to tracemalloc, so memory is RSS: `start()` resets
    the kernel's high-water mark (writing "5" to /proc/self/clear_refs resets VmHWM) and
    records VmRSS as the baseline; `extra_bytes()` is VmHWM - baseline. Where clear_refs is
    unavailable it falls back to ru_maxrss - baseline (an overestimate when the process
    peaked higher before `start`).
    """

    def start(self) -> PeakRss:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.reset = True
        except OSError:
            self.reset = False
        self.base_kib = _status_kib("VmRSS")
        self.maxrss_before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return self

    def extra_bytes(self) -> tuple[int, str]:
        """(extra peak bytes since `start`, how it was measured)."""
        hwm = _status_kib("VmHWM")
        if self.reset and hwm is not None:
            return (hwm - self.base_kib) * 1024, "VmHWM after clear_refs"
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return ((maxrss - (self.base_kib or 0)) * 1024,
                f"ru_maxrss (before run: {self.maxrss_before_kib} KiB)")


def children_usage() -> dict[str, float]:
    """CPU seconds (user + system) of the waited-for child processes so far, and the largest
    peak RSS among them in MiB (ru_maxrss is in KiB on Linux). CPU seconds barely move with
    other load on a shared machine; wall time does."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mib": usage.ru_maxrss / 1024}


# -- subprocesses and results -----------------------------------------------------------------


def worker_env(**extra: str) -> dict[str, str]:
    """The environment for a benchmark's worker subprocess: the checkout on PYTHONPATH.

    A worker may run in an interpreter where the project's editable install is not active
    (the CCE venv of docs/BENCHMARKS.md reaches this venv's site-packages through a plain
    path .pth, which does not run the editable finder), so the checkout is named explicitly.
    """
    return {**os.environ, "PYTHONPATH": str(REPO), **extra}


def jsonable(value: Any) -> Any:
    """`value` as strict JSON data: NaN and infinities become None, numpy scalars and arrays
    plain numbers and lists (through `.tolist()`), paths strings, tuples lists."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(key): jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "as_json"):
        return jsonable(value.as_json())
    if hasattr(value, "tolist"):  # numpy scalars and arrays, torch tensors
        return jsonable(value.tolist())
    if isinstance(value, numbers.Real):  # other real numbers (Fraction, Decimal-like)
        return jsonable(float(value))
    return str(value)


def dumps(payload: Any, indent: int | None = None) -> str:
    """`payload` as strict JSON text (``allow_nan=False``; NaN and inf as null)."""
    return json.dumps(jsonable(payload), indent=indent, allow_nan=False)


def write_json(path: str | Path, payload: Any) -> Path:
    """Write `payload` as strict JSON (`dumps`, indented) to `path`, creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dumps(payload, indent=2) + "\n", encoding="utf-8")
    return path
