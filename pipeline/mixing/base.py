"""The mixing-stage interface and left-to-right composition.

A stage is a pure function of (source sizes, training progress in [0, 1], its own
parameters, and the plan produced by the stages to its left) to a `MixturePlan`. It holds
no state and draws no random numbers, so a plan can be recomputed at any step.
"""

from __future__ import annotations

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
        sources). True unless a stage says otherwise: a wrong True costs time, a wrong False
        would freeze a schedule."""
        return True

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

