"""How much of each optional part of a decision runs now (:class:`Planner`), from the time
budget (:mod:`~lightning_sens.callbacks.budget`), the run's planned length and what the monitor
knows of its costs."""

from __future__ import annotations

import math
import time

from lightning_sens.callbacks.budget import Fit, TimeBudget
from lightning_sens.callbacks.policy import Failures

__all__ = [
    "DECISION_PARTS",
    "EXACT",
    "EXACT_FORWARDS_PER_CLASS",
    "FIGURES",
    "FIRST_LOOK_SECONDS",
    "FLAGS",
    "MIN_EXACT",
    "SCAN",
    "SECONDS_PER_FIGURE",
    "SECOND_FORWARD",
    "SETUP_CHECK",
    "TRAIN_PROBE",
    "TRAIN_STEPS",
    "VALIDATION_SCORES",
    "Planner",
]

# The parts the budget charges. Optional, run as far as they fit:
EXACT, TRAIN_PROBE, SCAN, FIGURES = "exact probes", "train probe", "scan", "figures"
# ... and never skipped: the check before the first step (once per fit), and the parts that
# recur, each named with its fix where they alone exceed the budget. A decision's own
# (DECISION_PARTS) run at every decision; on runs of a minute or more, decisions come less often
# where they would not fit (Planner.decision_fits).
SETUP_CHECK, SECOND_FORWARD = "setup check", "second forward"
TRAIN_STEPS, VALIDATION_SCORES, FLAGS = "training steps", "validation scores", "flags"
DECISION_PARTS = (VALIDATION_SCORES, SECOND_FORWARD, FLAGS)
_FIXES = {
    SECOND_FORWARD: (
        "a second forward pass of every validation batch",
        "validation_step returns no logits: return them, `return logits` or a dict with a "
        "'logits' entry, and the validation scores cost nothing",
    ),
    FLAGS: ("the flags and tables of every sample", "every_n_epochs > 1 decides less often"),
    VALIDATION_SCORES: (
        "the scores of every validation sample",
        "every_n_epochs > 1 scores every n-th validation only",
    ),
    TRAIN_STEPS: (
        "scoring the training steps' logits (every n-th position of a model with many)",
        "score_training_steps=False leaves it out; the training curves then come from a probe",
    ),
}

# Until a part has run once, the budget assumes: the exact engine costs this many forward passes
# per probe sample and split (one forward, K − 1 backward products, the Grams, in chunks smaller
# than the validation batches: about 10 K on a small CNN), and a figure this many seconds of CPU
# time (matplotlib with fixed layouts, on the CPU of the training machine: about 0.13 s on two
# cores of a shared AMD EPYC, docs/performance.md).
EXACT_FORWARDS_PER_CLASS = 10.0
SECONDS_PER_FIGURE = 0.15
MIN_EXACT = 4  # fewer exact-probe samples per split than this are not worth an engine call
_SECONDS_PER_ROW = 1e-5  # flags and tables, per scored sample, until measured
# The first look (the exact probes and the figures once, at the first decision) may spend the
# budget's share of the whole run as planned, and of at least this many seconds of it.
FIRST_LOOK_SECONDS = 60.0


class Planner:
    """Answers "how much of this part now?" during fit, and "all of it" outside fit or without a
    budget; says once per run and part when it scales a part down.

    The budget is kept as it accrues: a part runs when the monitor's seconds so far, plus the
    part's, stay within ``share`` × the seconds of everything else. Except once: the first
    decision that finds the exact probes or the figures out of budget still runs their smallest
    useful amount on one split (:data:`MIN_EXACT` samples of the validation split, or of the
    training split without one; that split's figures), when the smallest amount of both splits
    fits the share of the whole run as Lightning plans it (``progress``), counted as at least
    :data:`FIRST_LOOK_SECONDS`; later decisions pay that advance back before they run more.

    Attributes:
        budget: what the monitor spent and what each part costs.
        active: during fit with a budget.
        forward_cost: seconds per validation sample of the validation loop's own forward (the
            prior of the parts that have not run yet), None until measured.
        rows: the scored samples of this decision (its flag table's rows: the reserve).
        progress: the share of the run's steps done, where Lightning knows the run's length.
        looked: the optional parts that ran at least once.
        decision_cost: what the last decision's never-skipped parts took, in seconds.
    """

    def __init__(self, budget: TimeBudget, failures: Failures) -> None:
        self.budget = budget
        self.failures = failures
        self.active = False
        self.forward_cost: float | None = None
        self.rows = 0
        self.progress: float | None = None
        self.looked: set[str] = set()
        self.decision_cost: float | None = None  # the last decision's never-skipped seconds
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
        reserve = 0.0  # the flags and tables still to come in this decision
        if part != FIGURES:
            reserve = self.budget.unit_cost.get(FLAGS, _SECONDS_PER_ROW * self.rows)
        found = self.budget.fit(part, wanted, minimum, prior, reserve)
        if found.units == 0 and part in (EXACT, FIGURES) and part not in self.looked:
            found = self._first_look(part, wanted, minimum, prior, reserve) or found
        if found.units:
            self.looked.add(part)
        return found

    def planned_seconds(self) -> float:
        """The run's length as Lightning plans it (``max_epochs``/``max_steps``), in seconds of
        everything but the monitor; inf where it is not known."""
        return self.budget.rest / self.progress if self.progress else math.inf

    def decision_fits(self) -> bool:
        """Whether the never-skipped work of a decision (the scores of every validation sample,
        the flags and tables of every sample), as much as the last one took, fits the budget now.

        Always on a run planned shorter than :data:`FIRST_LOOK_SECONDS` (its every decision
        costs less than its first look; a run of unknown length, until it has lasted that long)
        and before a decision has been measured; else the monitor decides at a later
        validation, and the training steps meanwhile land in that decision's table."""
        if not self.active or self.decision_cost is None:
            return True
        planned = self.planned_seconds()
        if (self.budget.rest if math.isinf(planned) else planned) < FIRST_LOOK_SECONDS:
            return True
        return self.budget.allowance >= self.decision_cost

    def run_allowance(self) -> float:
        """Seconds the monitor may spend over the whole run as Lightning plans it: ``share`` ×
        the run's planned length, counted as at least :data:`FIRST_LOOK_SECONDS`."""
        return (self.budget.share or 0.0) * max(self.planned_seconds(), FIRST_LOOK_SECONDS)

    def _first_look(
        self, part: str, wanted: int, minimum: int, prior: float | None, reserve: float
    ) -> Fit | None:
        """The smallest useful amount of ``part``, once per run, where it costs less than the
        budget of the whole run."""
        units = min(minimum, wanted)
        cost = self.budget.unit_cost.get(part, prior)
        allowance = self.run_allowance()
        if cost is not None and cost * units + reserve > allowance:
            return None
        planned = "an open-ended run" if math.isinf(allowance) else f"{allowance:.2g} s"
        reason = f"a first look, within the budget of the whole run ({planned})"
        return Fit(units, wanted, reason, first_look=True)

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

    def over(self, epoch: int) -> None:
        """Once per run: the recurring parts that are never skipped alone exceed the budget;
        they are named, largest first, each with its fix (the one-off check before the first
        step is charged, but not named: a longer run spreads it)."""
        share = self.budget.share
        if not self.active or share is None:
            return
        mandatory = self.budget.share_of(tuple(_FIXES))
        if not mandatory > share:
            return
        parts = sorted(_FIXES, key=lambda p: -self.budget.totals.get(p, 0.0))
        named = [
            f"{_FIXES[p][0]}, {100 * self.budget.share_of((p,)):.1f} % ({_FIXES[p][1]})"
            for p in parts
            if self.budget.share_of((p,)) >= 0.001
        ]
        self.failures.info_once(
            "budget:never-skipped",
            f"SensitivityMonitor (budget={share:g}) spent {100 * mandatory:.1f} % of the training "
            f"time by epoch {epoch} on what it never skips, more than its budget: "
            f"{'; '.join(named)}.",
        )
