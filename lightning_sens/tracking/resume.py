"""Resuming the monitor's state from a checkpoint made with other options.

A checkpoint keeps the options it was saved with. On load, every option that changed is named,
and what it invalidates is dropped rather than silently mixed with the new options:

- ``seed``, ``train_probe_size``, ``exact_probe_size``: the probes are drawn again (also when the
  dataset no longer holds a probe's samples);
- ``flag_rule``: the estimated counts of wrong labels (the noise floor) start again, since they
  are per rule (the training-set evidence itself, log FI under every label, is kept);
- ``persistence``: the flag history is kept and counted over the new window.

Everything else (history, flag history, evidence) is kept.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from lightning_sens.flagging import FlagHistory
from lightning_sens.label_noise import LabelEvidence

if TYPE_CHECKING:
    from lightning_sens.tracking.tracker import SensitivityTracker

__all__ = ["INVALIDATES", "restore"]

INVALIDATES: dict[str, str] = {
    "seed": "the probes are drawn again",
    "train_probe_size": "the probes are drawn again",
    "exact_probe_size": "the probes are drawn again",
    "flag_rule": "the estimated counts of wrong labels start again",
    "persistence": "the flag history is counted over the new window",
}


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def changed_options(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Option → (saved value, current value), for the options that differ."""
    return {
        name: (saved[name], current[name])
        for name in sorted(set(saved) & set(current))
        if _plain(saved[name]) != _plain(current[name])
    }


def restore(tracker: SensitivityTracker, state: dict[str, Any]) -> list[str]:
    """Load ``state`` into ``tracker``, dropping what the changed options invalidate; one line
    per changed option (what it was, what it is, what that reset)."""
    changed = changed_options(state.get("config", {}), tracker.config.to_dict())
    lines = [
        f"{name}: {old!r} → {new!r}" + (f" ({INVALIDATES[name]})" if name in INVALIDATES else "")
        for name, (old, new) in changed.items()
    ]
    redraw = {"seed", "train_probe_size", "exact_probe_size"} & set(changed)
    tracker.probes = (
        {} if redraw else {k: torch.tensor(v, dtype=torch.long) for k, v in state["probes"].items()}
    )
    tracker.history = list(state["history"])
    tracker.flags = FlagHistory.from_state_dict(state["flags"])
    tracker.flags.window = tracker.config.persistence
    evidence = state.get("evidence")
    tracker.evidence = None if evidence is None else LabelEvidence.from_state_dict(evidence)
    first = state.get("first")
    tracker.first = None if first is None else LabelEvidence.from_state_dict(first)
    tracker.noise_floor = None if "flag_rule" in changed else state.get("noise_floor")
    shares = state.get("position_evidence")
    tracker.position_evidence = None if shares is None else LabelEvidence.from_state_dict(shares)
    first_shares = state.get("position_first")
    tracker.position_first = (
        None if first_shares is None else LabelEvidence.from_state_dict(first_shares)
    )
    tracker.position_decisions = int(state.get("position_decisions", 0))
    tracker.folds = int(state.get("folds", 0))
    tracker.validations = int(state.get("validations", 0))
    return lines
