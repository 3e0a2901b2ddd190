"""Figures drawn on a background thread: the training thread never waits on matplotlib.

The monitor prepares everything a figure needs on the training thread (scores, probe results,
the pictured samples, already fetched from the dataset so that no dataset code runs
concurrently with training's data loading), then hands a job to :class:`FigureWorker`. The job
renders with matplotlib's object API (no pyplot, so no global figure state is shared between
threads) and logs the images itself. Its CPU time is charged to the monitor's time budget.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from lightning_sens.callbacks.budget import TimeBudget

__all__ = ["FigureWorker"]

PART = "figures"


class FigureWorker:
    """One background thread; jobs are drawn in the order they were submitted.

    Args:
        budget: charged with each job's CPU time, which also becomes the cost per figure that
            the budget's ``fit("figures", ...)`` uses.
    """

    def __init__(self, budget: TimeBudget) -> None:
        self.budget = budget
        self._executor: ThreadPoolExecutor | None = None
        self._pending: list[Future[None]] = []
        self.drawn = 0  # jobs drawn to the end

    def __getstate__(self) -> dict[str, object]:  # picklable: the thread does not travel
        return {"budget": self.budget, "_executor": None, "_pending": [], "drawn": self.drawn}

    @property
    def busy(self) -> bool:
        """A job is still being drawn."""
        return any(not job.done() for job in self._pending)

    def submit(self, job: Callable[[], int]) -> None:
        """Run ``job`` (returns how many figures it drew) after the job before it."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="lightning-sens-figures")
        budget = self.budget

        def charged() -> None:
            begin = time.thread_time()
            count = 0
            try:
                count = job()
                self.drawn += 1
            finally:
                seconds = time.thread_time() - begin
                budget.add(seconds)
                budget.learn(PART, seconds, count)

        self._pending.append(self._executor.submit(charged))

    def wait(self) -> BaseException | None:
        """Block until every job is drawn; the first error, if one failed."""
        pending, self._pending = self._pending, []
        errors = [job.exception() for job in pending]
        return next((e for e in errors if e is not None), None)

    def failure(self) -> BaseException | None:
        """The first error of the finished jobs (each reported once), without waiting."""
        done = [job for job in self._pending if job.done()]
        self._pending = [job for job in self._pending if not job.done()]
        return next((e for e in (job.exception() for job in done) if e is not None), None)

    def close(self) -> BaseException | None:
        """Wait for the job in flight and stop the thread."""
        error = self.wait()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        return error
