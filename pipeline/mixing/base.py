"""The mixing-stage interface and left-to-right composition.

A stage is a pure function of (source sizes, training progress in [0, 1], its own
parameters, and the plan produced by the stages to its left) to a `MixturePlan`. It holds
no state and draws no random numbers, so a plan can be recomputed at any step.
"""

from __future__ import annotations

import dis
import inspect
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence

from pipeline.mixing.plan import MixturePlan, validate_progress, validate_sizes


class MixingStage(ABC):
    """Base class: subclasses implement `apply`; users call `plan`."""

    def plan(self, sizes: Mapping[str, float], progress: float = 0.0) -> MixturePlan:
        """The plan of this stage alone at `progress` (fraction of training, in [0, 1]).

        Args:
            sizes: {source: size}; the unit (documents, tokens) is the caller's choice and
                every stage treats it the same way.
            progress: fraction of the planned run completed.
        """
        names, _ = validate_sizes(sizes)
        return self.apply(sizes, validate_progress(progress), None)

    @abstractmethod
    def apply(
        self, sizes: Mapping[str, float], progress: float, previous: MixturePlan | None
    ) -> MixturePlan:
        """Return a plan; `previous` is the plan of the stages to the left (None if first)."""

    def breakpoints(self) -> tuple[float, ...]:
        """Progress values where this stage's schedule changes phase (for the report)."""
        return ()

    def depends_on_progress(self) -> bool:
        """Whether this stage's plan can change with progress. A schedule evaluates a stage
        that does not once instead of at every segment (10^3 evaluations, seconds with 10^4
        sources). By default: whether `apply` reads its progress argument at all (a stage
        that never reads it cannot depend on it); override to say so explicitly."""
        return _reads_argument(type(self).apply, 2)

    # Whether the plans promise at most some number of passes over a source within the
    # planned run (UniMax's max_epochs). Past the plan the last plan would keep drawing and
    # break the promise, so the sampler refuses steps beyond run.total_steps for such a mixture.
    caps_epochs: bool = False

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({params})"


class Compose(MixingStage):
    """Apply stages left to right, each refining the plan of the ones before it.

    Example: ``Compose([Cooldown(5, 1, 0.5), Upweight()])`` keeps proportional sampling and
    expresses the Cooldown schedule entirely through loss weights.
    """

    def __init__(self, stages: Sequence[MixingStage]):
        stages = list(stages)
        if not stages:
            raise ValueError("Compose needs at least one mixing stage")
        for position, stage in enumerate(stages):
            if not isinstance(stage, MixingStage):
                raise ValueError(
                    f"mixing stage #{position} is {stage!r}, not a MixingStage; "
                    "check the _target_ of conf/mixture entries"
                )
        self.stages = stages

    def apply(
        self, sizes: Mapping[str, float], progress: float, previous: MixturePlan | None
    ) -> MixturePlan:
        plan = previous
        for stage in self.stages:
            plan = stage.apply(sizes, progress, plan)
        assert plan is not None
        return plan

    def breakpoints(self) -> tuple[float, ...]:
        return tuple(sorted({b for stage in self.stages for b in stage.breakpoints()}))

    @property
    def caps_epochs(self) -> bool:
        return any(stage.caps_epochs for stage in self.stages)

    def depends_on_progress(self) -> bool:
        return any(stage.depends_on_progress() for stage in self.stages)


def _reads_argument(function, position: int) -> bool:
    """Whether `function` may read its positional argument `position` (0 is self).

    True unless its bytecode provably never loads it: no *args/**kwargs, no nested function
    or comprehension capturing it, no load instruction naming it. Conservative: anything
    it cannot see through (a wrapper, a builtin) counts as reading."""
    code = getattr(function, "__code__", None)
    if code is None or code.co_flags & (inspect.CO_VARARGS | inspect.CO_VARKEYWORDS) or code.co_argcount <= position:
        return True
    name = code.co_varnames[position]
    if name in code.co_cellvars:
        return True
    for instruction in dis.get_instructions(code):
        argval = instruction.argval
        if "LOAD" in instruction.opname and (argval == name or (isinstance(argval, tuple) and name in argval)):
            return True
    return False
