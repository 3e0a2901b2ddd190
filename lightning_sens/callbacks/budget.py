"""The monitor's time budget: what it has spent, and how much of each optional part fits now.

No Lightning here. The monitor charges every hook it runs on the training thread
(:meth:`TimeBudget.timed`) and the CPU time of the figure worker (:meth:`TimeBudget.add`);
before an optional part (the exact probes, the training probe, the scan, the figures) it asks
:meth:`TimeBudget.fit` how many units of it the budget allows now. The closed-form scores, the
flags and the tables are not optional: they are charged but never refused.

The budget is a share of the rest of training: ``share = 0.05`` keeps the monitored run within
1.05 × the run without the monitor (monitor seconds ≤ 0.05 × the other seconds), measured from
the start of training, at every moment a part is started.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Fit", "TimeBudget"]


class _Timed:
    """:meth:`TimeBudget.timed`'s context: a class, not a generator, because the monitor enters
    one around every training step's hooks (a generator context costs twice as much)."""

    __slots__ = ("_begin", "_budget", "_part", "_units")

    def __init__(self, budget: TimeBudget, part: str | None, units: int) -> None:
        self._budget, self._part, self._units, self._begin = budget, part, units, 0.0

    def __enter__(self) -> None:
        self._begin = self._budget._enter()

    def __exit__(self, *exc: object) -> None:
        self._budget._exit(self._begin, self._part, self._units)


@dataclass(frozen=True)
class Fit:
    """The answer for one optional part: ``units`` to run now (0: skip it this epoch)."""

    units: int
    wanted: int
    reason: str = ""  # why fewer than wanted: for the one-line notice
    first_look: bool = False  # the run's first look: the smallest useful amount, one split

    @property
    def reduced(self) -> bool:
        return self.units < self.wanted


class TimeBudget:
    """Wall time spent by the monitor against ``share`` of the rest of training.

    Args:
        share: the monitor's seconds per second of everything else; None: no limit (every part
            always fits, the costs are still measured).
        clock: seconds, monotonic (tests pass a fake one).
    """

    def __init__(self, share: float | None, clock: Callable[[], float] = time.perf_counter):
        self.share = share
        self.clock = clock
        self.started: float | None = None
        self.stopped: float | None = None
        self.spent = 0.0
        self.unit_cost: dict[str, float] = {}  # seconds per unit, from the last run of a part
        self.totals: dict[str, float] = {}  # seconds per named part, since the start
        self._depth = 0
        self._open_since = 0.0  # when the outermost timed block began
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, object]:  # picklable (spawned DDP workers): no lock
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def start(self) -> None:
        """Fit starts: the clock runs from here; what was spent before does not count."""
        self.started, self.stopped, self.spent, self.totals = self.clock(), None, 0.0, {}

    def stop(self) -> None:
        """Training ended: the shares stay those of the run."""
        self.stopped = self.clock()

    @property
    def elapsed(self) -> float:
        if self.started is None:
            return 0.0
        return (self.stopped if self.stopped is not None else self.clock()) - self.started

    @property
    def used(self) -> float:
        """Seconds charged so far, the timed block in progress included."""
        running = self.clock() - self._open_since if self._depth else 0.0
        return self.spent + running

    @property
    def rest(self) -> float:
        """Seconds of everything but the monitor since the start."""
        return self.elapsed - self.used

    @property
    def cost_share(self) -> float:
        """Monitor seconds per second of the rest of training, so far (nan before any)."""
        used = self.used
        rest = self.elapsed - used
        return used / rest if rest > 0 else math.nan

    def share_of(self, parts: tuple[str, ...]) -> float:
        """The seconds of the named parts per second of the rest of training, so far."""
        rest = self.rest
        return sum(self.totals.get(p, 0.0) for p in parts) / rest if rest > 0 else math.nan

    @property
    def allowance(self) -> float:
        """Seconds the monitor may spend now without exceeding its share."""
        if self.share is None or self.started is None or self.stopped is not None:
            return math.inf
        used = self.used
        return self.share * (self.elapsed - used) - used

    def add(self, seconds: float) -> None:
        """Charge seconds spent elsewhere (the figure worker's CPU time). Thread-safe."""
        with self._lock:
            self.spent += seconds

    def timed(self, part: str | None = None, units: int = 1) -> _Timed:
        """A context that charges the wall time of its block (nested blocks are charged once, by
        the outermost); with ``part``, also adds it to the part's total and learns its cost per
        unit for :meth:`fit`."""
        return _Timed(self, part, units)

    def _enter(self) -> float:
        begin = self.clock()
        if self._depth == 0:
            self._open_since = begin
        self._depth += 1
        return begin

    def _exit(self, begin: float, part: str | None, units: int) -> None:
        self._depth -= 1
        seconds = self.clock() - begin
        if self._depth == 0:
            self.add(seconds)
        if part is not None:
            self.totals[part] = self.totals.get(part, 0.0) + seconds
            if units > 0:
                self.unit_cost[part] = seconds / units

    def learn(self, part: str, seconds: float, units: int = 1) -> None:
        """The measured cost of a part that ran elsewhere (the figures)."""
        if units > 0:
            self.unit_cost[part] = seconds / units

    def fit(
        self,
        part: str,
        wanted: int,
        minimum: int = 1,
        prior: float | None = None,
        reserve: float = 0.0,
    ) -> Fit:
        """How many of ``wanted`` units of ``part`` fit the allowance now, keeping ``reserve``
        seconds for the work that must follow (the flag tables).

        The cost per unit is the last measured one, else ``prior`` (None: unknown, and the part
        runs ``minimum`` units once to measure itself, if anything is allowed at all). Fewer
        than ``minimum`` units are not worth running: then 0.
        """
        if wanted <= 0:
            return Fit(0, 0)
        allowance = self.allowance - reserve
        if math.isinf(allowance):
            return Fit(wanted, wanted)
        cost = self.unit_cost.get(part, prior)
        minimum = min(minimum, wanted)
        if cost is None:
            units = minimum if allowance > 0 else 0
            return Fit(units, wanted, "its cost is not measured yet")
        units = wanted if cost <= 0 else min(wanted, int(max(allowance, 0.0) / cost))
        if units < minimum:
            units = 0
        reason = ""
        if units < wanted:
            reason = (
                f"{wanted} would take about {wanted * cost:.2g} s, {max(allowance, 0.0):.2g} s "
                "were left in the budget"
            )
        return Fit(units, wanted, reason)
