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
from concurrent.futures import Future, ThreadPoolExecutor, wait

from lightning_sens.callbacks.budget import TimeBudget

__all__ = ["FigureWorker"]

PART = "figures"


class FigureWorker:
    """Background threads, one per job, each ending with its job; jobs are drawn in the order
    they were submitted.

    Args:
        budget: charged with each job's CPU time, which also becomes the cost per figure that
            the budget's ``fit("figures", ...)`` uses.
    """

    def __init__(self, budget: TimeBudget) -> None:
        self.budget = budget
        self._pending: list[Future[None]] = []
        self.drawn = 0  # jobs drawn to the end

    def __getstate__(self) -> dict[str, object]:  # picklable: the threads do not travel
        return {"budget": self.budget, "_pending": [], "drawn": self.drawn}

    @property
    def busy(self) -> bool:
        """A job is still being drawn."""
        return any(not job.done() for job in self._pending)

    def submit(self, job: Callable[[], int]) -> None:
        """Run ``job`` (returns how many figures it drew) after the job before it, on a thread
        of its own that ends with it.

        A thread that lives on would keep the OpenMP threads that torch gave it for its tensor
        operations: two teams on the training machine's cores make OpenMP stop spinning and
        every small operation of training wait to wake its threads (measured: the demo's
        epochs 30 % longer, with less CPU time, for the rest of the run after one figure set).
        """
        budget, previous = self.budget, self._pending[-1] if self._pending else None

        def charged() -> None:
            if previous is not None:  # in the order submitted
                wait([previous])
            begin = time.thread_time()
            count = 0
            try:
                count = job()
                self.drawn += 1
            finally:
                seconds = time.thread_time() - begin
                budget.add(seconds)
                budget.learn(PART, seconds, count)

        executor = ThreadPoolExecutor(1, thread_name_prefix="lightning-sens-figures")
        self._pending.append(executor.submit(charged))
        executor.shutdown(wait=False)  # its thread ends when the job does

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
        """Wait for the jobs in flight (their threads end with them)."""
        return self.wait()
