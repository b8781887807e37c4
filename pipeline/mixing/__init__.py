"""Data-mixing stages: pure functions from source sizes and progress to a `MixturePlan`.

Usable without Lightning::

    from pipeline.mixing import Compose, Cooldown, Upweight
    plan = Compose([Cooldown(tau_start=5, tau_end=1, switch_at=0.5)]).plan(sizes, 0.3)
    plan.sample_probs, plan.loss_weights
"""

from pipeline.mixing.base import Compose, MixingStage
from pipeline.mixing.cooldown import Cooldown
from pipeline.mixing.manual import Manual
from pipeline.mixing.order_matters import OrderMatters
from pipeline.mixing.plan import MixturePlan
from pipeline.mixing.temperature import Proportional, Temperature, temperature_probs
from pipeline.mixing.unimax import UniMax, unimax_allocation
from pipeline.mixing.upweight import Upweight

__all__ = [
    "Compose",
    "Cooldown",
    "Manual",
    "MixingStage",
    "MixturePlan",
    "OrderMatters",
    "Proportional",
    "Temperature",
    "UniMax",
    "Upweight",
    "temperature_probs",
    "unimax_allocation",
]
