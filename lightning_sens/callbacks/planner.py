"""How much of each optional part of a monitored epoch runs now (:class:`Planner`), from the
time budget (:mod:`~lightning_sens.callbacks.budget`) and what the monitor knows of its costs."""

from __future__ import annotations

import time

from lightning_sens.callbacks.budget import Fit, TimeBudget
from lightning_sens.callbacks.policy import Failures

__all__ = ["EXACT_FORWARDS_PER_CLASS", "MIN_EXACT", "SECONDS_PER_FIGURE", "Planner"]

# Until a part has run once, the budget assumes: the exact engine costs this many forward passes
# per probe sample and split (one forward, K − 1 backward products, the Grams, in chunks smaller
# than the validation batches: about 10 K on a small CNN), and a figure this many seconds of CPU
# time (matplotlib, on the CPU of the training machine).
EXACT_FORWARDS_PER_CLASS = 10.0
SECONDS_PER_FIGURE = 0.25
MIN_EXACT = 4  # fewer exact-probe samples per split than this are not worth an engine call
_SECONDS_PER_ROW = 1e-5  # flags and tables, per scored sample, until measured


class Planner:
    """Answers "how much of this part now?" during fit, and "all of it" outside fit or without a
    budget; says once per run and part when it scales a part down.

    Attributes:
        budget: what the monitor spent and what each part costs.
        active: during fit with a budget.
        forward_cost: seconds per validation sample of the validation loop's own forward (the
            prior of the parts that have not run yet), None until measured.
        rows: the scored samples of this epoch (its flag table's rows: the reserve).
    """

    def __init__(self, budget: TimeBudget, failures: Failures) -> None:
        self.budget = budget
        self.failures = failures
        self.active = False
        self.forward_cost: float | None = None
        self.rows = 0
        self._clock = (0.0, 0.0)

    def start_clock(self) -> None:
        """The validation loop starts: its own time per sample is the budget's prior."""
        self._clock = (time.perf_counter(), self.budget.used)

    def stop_clock(self, samples: int) -> None:
        """The validation loop ends after ``samples``: its time, less the monitor's, per sample."""
        began, used = self._clock
        loop = time.perf_counter() - began - (self.budget.used - used)
        self.forward_cost = max(loop, 0.0) / samples

    def fit(self, part: str, wanted: int, minimum: int = 1, prior: float | None = None) -> Fit:
        if not self.active:
            return Fit(wanted, wanted)
        reserve = 0.0  # the flags and tables still to come in this epoch
        if part != "figures":
            reserve = self.budget.unit_cost.get("flags", _SECONDS_PER_ROW * self.rows)
        return self.budget.fit(part, wanted, minimum, prior, reserve)

    def prior(self, forwards: float) -> float | None:
        """The cost of ``forwards`` validation forward passes per sample, if measured."""
        return None if self.forward_cost is None else forwards * self.forward_cost

    def notice(self, part: str, fit: Fit, what: str, epoch: int) -> None:
        """One line per run and part, the first time the budget scales the part down."""
        if fit.reduced:
            self.failures.info_once(
                f"budget:{part}",
                f"SensitivityMonitor (budget={self.budget.share:g} of the training time) {what} "
                f"at epoch {epoch}: {fit.reason}. It measures its own cost as it runs and does "
                "more as training time accrues; SensitivityMonitor(budget=None) keeps the fixed "
                "schedule.",
            )

    def over(self, epoch: int, seconds: float) -> None:
        """Once per run: the parts that are never skipped alone exceed the budget."""
        if self.active and self.budget.allowance < 0:
            self.failures.info_once(
                "budget:flags",
                f"SensitivityMonitor (budget={self.budget.share:g}) spent "
                f"{100 * self.budget.cost_share:.1f} % of the training time by epoch {epoch}, "
                "more than its budget, with what it never skips (the scores, flags and tables; "
                f"{seconds:.2g} s for the flags and tables of this epoch). On models this fast, "
                "pass a larger budget or every_n_epochs > 1.",
            )
