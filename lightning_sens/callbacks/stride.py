"""How many of each sample's positions the monitor scores: every one, or every n-th where
scoring them all would take more than its share of the time budget (docs/tasks.md, "What
scoring costs, and every n-th position").

No Lightning here. Scoring a step's tokens or pixels costs a share of the step that does not
shrink with more data (four passes over the step's logits, whose computation is a few passes
too); on narrow models it is a fifth of the step. :class:`PositionStride` measures that share
over the first training steps and, where it exceeds :data:`PART` of the budget, scores every
n-th position of each sample instead (n a power of two), a different one each epoch, so that n
epochs score every position once.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from lightning_sens.callbacks.budget import TimeBudget
from lightning_sens.core.references import FlagKind

__all__ = [
    "EVERY",
    "JUDGED_HITS",
    "MAX_STRIDE",
    "MIN_SCORED",
    "PART",
    "PositionStride",
    "least_scored",
]

PART = 0.5
"""The share of the monitor's budget that the training steps' scores may take."""

MIN_SCORED = 16
"""The fewest positions of a sample that a stride ever leaves to score."""

EVERY = 1 << 62
"""A sample's positions, whatever their number: never strided."""

JUDGED_HITS = 4
"""Where labels are judged (``flag_kind`` "labels"), a stride leaves at least this many
positions per ``position_flag_share``: one position that looks wrong among those scored must
not reach the cut alone (a sample's estimate is twice the share that looks wrong), nor move the
share of samples that reach it, which decides whether a decision counts (docs/tasks.md)."""

MAX_STRIDE = 64
"""The largest stride."""

_WARMUP = 2  # steps left out of the first measurement (the first finds the logits)
_WINDOW = 16  # steps per measurement
_CHECKS = 4  # measurements at most: the stride only grows, and settles within them


class PositionStride:
    """The stride of the positions scored, from the measured cost of scoring the training steps.

    Args:
        fixed: the ``position_stride`` option: a stride to keep (None: measured).
        budget: the monitor's time budget (its share None: every position).
        part: the budget's part that the training steps are charged to.
        tell: ``(key, message)`` for the one line that says what was chosen.
        flag_share: the ``position_flag_share`` option (:func:`least_scored`).

    Attributes:
        stride: score every ``stride``-th position of each sample.
        full: the measured share of the rest of training that scoring took at stride 1 (NaN
            before it is measured).
        settled: no more measurements.
    """

    def __init__(
        self,
        fixed: int | None,
        budget: TimeBudget,
        part: str,
        tell: Callable[[str, str], None],
        flag_share: float = 0.02,
    ) -> None:
        self.flag_share = flag_share  # position_flag_share: how few positions flags can judge
        self.stride = fixed or 1
        self.budget, self.part, self.tell = budget, part, tell
        self.settled = fixed is not None or budget.share is None
        self.full = math.nan
        self._steps = self._checks = 0
        self._since = (0.0, 0.0)  # (the part's seconds, the rest's) when the window began

    def largest(self, positions: int, least: int = MIN_SCORED) -> int:
        """The largest stride (a power of two) that leaves ``least`` positions of a sample with
        ``positions``, at most :data:`MAX_STRIDE`."""
        most = max(1, min(MAX_STRIDE, positions // least))
        return 1 << (most.bit_length() - 1)

    def step(self, positions: int, least: int = MIN_SCORED) -> int:
        """After a scored training step of samples with ``positions`` positions, of which a
        stride must leave ``least`` (:func:`least_scored`): the stride from now on."""
        if self.settled:
            return self.stride
        self._steps += 1
        spent = (self.budget.totals.get(self.part, 0.0), self.budget.rest)
        if self._steps == _WARMUP:
            self._since = spent
        if self._steps < _WARMUP + _WINDOW or (self._steps - _WARMUP) % _WINDOW:
            return self.stride
        used, rest = (now - then for now, then in zip(spent, self._since, strict=True))
        self._since = spent
        self._checks += 1
        share = used / rest if rest > 0 else math.inf
        if self.stride == 1:
            self.full = share
        target = PART * float(self.budget.share or 0.0)
        most = self.largest(positions, least)
        if share <= target or self.stride >= most or self._checks >= _CHECKS:
            return self._settle(share, target, most, least)
        wanted = self.stride * 2 ** math.ceil(math.log2(share / target))
        self.stride = min(most, wanted)
        return self.stride

    def _settle(self, share: float, target: float, most: int, least: int) -> int:
        self.settled = True
        if self.stride == 1:
            return 1
        met = share <= target
        self.tell(
            "stride",
            f"SensitivityMonitor scores every {_ordinal(self.stride)} position of each sample "
            f"(from the sample's id plus the epoch, so {self.stride} epochs score each position "
            f"once): scoring every position took {_percent(self.full)} of the training time, "
            f"more than the {_percent(target)} its budget leaves to the training steps' scores"
            + (
                f"; every {_ordinal(self.stride)} position takes {_percent(share)}"
                if met
                else f", and every {_ordinal(self.stride)} still takes {_percent(share)} (at most "
                f"every {_ordinal(most)}, to leave {least} positions of a sample; "
                "score_training_steps=False leaves the training steps out)"
            )
            + ". position_stride=1 scores every position (docs/tasks.md).",
        )
        return self.stride


def least_scored(kind: FlagKind, flag_share: float) -> int:
    """The fewest positions of a sample that a stride may leave: :data:`JUDGED_HITS` /
    ``flag_share`` where labels are judged (200 at the default 2 %); every position of a
    language model's documents, whose flags compare their losses in robust standard deviations
    (measured: at every second token of 64, the noise of the loss of 32 hid three quarters of
    the shuffled documents that every token found); :data:`MIN_SCORED` otherwise."""
    if kind == "labels":
        return max(MIN_SCORED, math.ceil(JUDGED_HITS / flag_share))
    if kind == "documents":
        return EVERY
    return MIN_SCORED


def _percent(share: float) -> str:
    """``0.025`` → ``"2.5 %"``, ``5e-05`` → ``"0.005 %"``: two significant digits."""
    return f"{share * 100:.2g} %"


def _ordinal(n: int) -> str:
    """``2`` → ``"2nd"``, ``8`` → ``"8th"``."""
    if n % 100 in (11, 12, 13):
        return f"{n}th"
    return f"{n}{ {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th') }"
