"""The monitor's Lightning-free state (lightning_sens.tracking): the torchmetrics rows, the
tracker's update/gather/compute/reset, and resuming a state saved with other options."""

from __future__ import annotations

import warnings

import pytest
import torch

from lightning_sens import MonitorConfig, SensitivityMonitor
from lightning_sens.flagging import flag
from lightning_sens.reporting import keys
from lightning_sens.reporting.summary import split_scores
from lightning_sens.tracking import Probes, Samples, SensitivityTracker

K = 4


def _logits(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, K, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_samples_keep_rows_of_any_width_and_restore_their_dtypes() -> None:
    rows = Samples({"ids": torch.long, "scores": torch.float64})
    assert rows.gathered() is None  # nothing kept: None, and no torchmetrics warning
    rows.update(ids=torch.tensor([5, 1]), scores=torch.ones(2, 3, dtype=torch.float32))
    rows.update(ids=torch.tensor([2]), scores=torch.full((1, 3), 2.0, dtype=torch.float32))
    found = rows.gathered()
    assert found is not None
    assert found["ids"].dtype == torch.long
    assert found["ids"].tolist() == [5, 1, 2]
    assert found["scores"].dtype == torch.float64
    assert found["scores"].shape == (3, 3)
    assert found["scores"][:, 0].tolist() == [1.0, 1.0, 2.0]
    rows.reset()
    assert rows.gathered() is None
    with pytest.raises(ValueError, match="columns"):
        rows.update(ids=torch.tensor([1]))


def test_tracker_scores_flags_and_resets_an_epoch() -> None:
    """update → gather → compute equals scoring and flagging the same logits directly; the
    epoch joins the history; reset forgets the epoch's scores, not the history."""
    config = MonitorConfig(flag_rule="mad", flag_threshold=1.0)
    tracker = SensitivityTracker(config)
    labels = torch.arange(12) % K
    tracker.update(torch.arange(6, 12), labels[6:], _logits(6, 1))
    tracker.update(torch.arange(6), labels[:6], _logits(6, 0))
    scores = tracker.gather()
    assert list(scores) == ["val"]
    assert scores["val"].ids.tolist() == list(range(12))  # sorted by id
    direct = split_scores(torch.arange(12), labels, torch.cat([_logits(6, 0), _logits(6, 1)]))
    torch.testing.assert_close(scores["val"].log_fi_true, direct.log_fi_true, rtol=0, atol=0)
    report = tracker.compute(3, 30, scores, Probes(), use_evidence=False)
    want = flag(direct.log_fi_true, "mad", 1.0, config.top_k)
    assert report.metrics[keys.flag_count("val")] == float(want.flagged.sum())
    assert report.flags["flagged"] == want.flagged.tolist()
    assert tracker.history[-1]["epoch"] == 3
    assert tracker.history[-1]["step"] == 30
    assert tracker.history[-1][keys.flag_count("val")] == float(want.flagged.sum())
    tracker.reset()
    assert tracker.gather() == {}
    assert len(tracker.history) == 1


def test_the_epoch_reports_the_classes_the_rule_could_not_decide() -> None:
    """An untrained network's uniform logits: the "counterfactual" rule decides no class, logs
    their number, flags nothing and leaves p_bad NaN in the table; once the model separates
    the classes, none is undecided. The rules that decide every sample log no such count."""
    labels = torch.arange(16) % K
    separated = _logits(16, 2)
    separated[torch.arange(16), labels] += 8.0
    for logits, undecided in ((torch.zeros(16, K, dtype=torch.float64), K), (separated, 0)):
        tracker = SensitivityTracker(MonitorConfig(flag_rule="counterfactual"))
        tracker.update(torch.arange(16), labels, logits)
        report = tracker.compute(1, 10, tracker.gather(), Probes(), use_evidence=False)
        assert report.metrics[keys.undecided_classes("val")] == float(undecided)
        assert report.decisions["val"].undecided_classes == list(range(undecided))
        assert tracker.history[-1][keys.undecided_classes("val")] == float(undecided)
        p_bad = torch.tensor(report.flags["p_bad"])
        assert p_bad.isnan().all() if undecided else not p_bad.isnan().any()
        assert report.metrics[keys.flag_count("val")] == 0.0
    tracker = SensitivityTracker(MonitorConfig(flag_rule="mad"))
    tracker.update(torch.arange(16), labels, separated)
    report = tracker.compute(1, 10, tracker.gather(), Probes(), use_evidence=False)
    assert keys.undecided_classes("val") not in report.metrics


def test_a_probe_is_drawn_once_and_again_when_its_size_changes() -> None:
    tracker = SensitivityTracker(MonitorConfig(seed=3))
    first = tracker.probe("val", 50, 8)
    assert tracker.probe("val", 50, 8) is first  # the same samples every epoch
    larger = tracker.probe("val", 50, 12)
    assert len(larger) == 12
    assert larger[:8].tolist() == first.tolist()  # a larger probe keeps the samples it had
    smaller_set = tracker.probe("val", 5, 8)  # the dataset shrank: no index beyond it
    assert sorted(smaller_set.tolist()) == list(range(5))
    assert tracker.probe("train", 50, 8).tolist() != first.tolist()  # seed + 1 for val


def _filled(config: MonitorConfig) -> SensitivityTracker:
    """A tracker with every part of its state: probes, history, flags, evidence, noise floor."""
    tracker = SensitivityTracker(config)
    tracker.probe("train", 100, 16)
    labels = torch.arange(40) % K
    for epoch in range(3):
        tracker.fold(torch.arange(40), labels, _logits(40, epoch).log_softmax(-1).neg())
        tracker.update(torch.arange(20), labels[:20], _logits(20, 10 + epoch))
        scores = tracker.gather()
        tracker.compute(epoch, 10 * epoch, scores, Probes(), use_evidence=True)
        tracker.reset()
    assert tracker.noise_floor is not None
    return tracker


def test_resuming_with_the_same_options_restores_everything() -> None:
    config = MonitorConfig(train_probe_size=16, flag_rule="counterfactual")
    saved = _filled(config)
    resumed = SensitivityTracker(config)
    assert resumed.load_state_dict(saved.state_dict()) == ""
    assert resumed.probes["train"].tolist() == saved.probes["train"].tolist()
    assert resumed.history == saved.history
    assert resumed.flags == saved.flags
    assert resumed.evidence is not None
    assert saved.evidence is not None
    assert torch.equal(resumed.evidence.total, saved.evidence.total)
    assert saved.noise_floor is not None
    assert torch.equal(resumed.noise_floor, saved.noise_floor)  # type: ignore[arg-type]
    assert resumed.folds == saved.folds


@pytest.mark.parametrize(
    ("change", "said", "reset"),
    [
        (
            {"train_probe_size": 24},
            "train_probe_size: 16 → 24 (the probes are drawn again)",
            "probes",
        ),
        ({"seed": 7}, "seed: 0 → 7 (the probes are drawn again)", "probes"),
        ({"flag_rule": "counterfactual_pairs"}, "the estimated counts of wrong labels", "floor"),
        ({"persistence": 3}, "persistence: 5 → 3", "window"),
        ({"top_k": 5}, "top_k: 10 → 5", ""),
    ],
)
def test_resuming_with_other_options_names_them_and_resets_what_no_longer_fits(
    change: dict[str, object], said: str, reset: str
) -> None:
    saved = _filled(MonitorConfig(train_probe_size=16, flag_rule="counterfactual"))
    options = {"train_probe_size": 16, "flag_rule": "counterfactual", **change}
    config = MonitorConfig(**options)  # type: ignore[arg-type]
    resumed = SensitivityTracker(config)
    message = resumed.load_state_dict(saved.state_dict())
    assert said in message
    assert resumed.history == saved.history  # always kept
    assert resumed.evidence is not None
    assert (resumed.probes == {}) == (reset == "probes")
    assert (resumed.noise_floor is None) == (reset == "floor")
    assert resumed.flags.window == config.persistence
    assert resumed.flags.monitored == saved.flags.monitored


def test_the_monitor_warns_once_when_it_resumes_other_options() -> None:
    saved = SensitivityMonitor(train_probe_size=16, budget=None)
    saved.tracker.probe("train", 100, 16)
    state = saved.state_dict()
    with pytest.warns(UserWarning, match=r"resumes a state saved with other options: .*"
                      r"train_probe_size: 16 → 32 \(the probes are drawn again\)"):  # fmt: skip
        SensitivityMonitor(train_probe_size=32, budget=None).load_state_dict(state)
    same = SensitivityMonitor(train_probe_size=16, budget=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same.load_state_dict(state)  # the same options: silent
    assert same.tracker.probes["train"].tolist() == saved.tracker.probes["train"].tolist()


def test_the_state_key_depends_on_the_constructor_arguments_only() -> None:
    monitor = SensitivityMonitor(seed=1)
    key = monitor.state_key
    monitor.position = (3, 30)  # what evaluate sets per checkpoint does not move the key
    assert monitor.state_key == key
    assert SensitivityMonitor(seed=1).state_key == key
    assert SensitivityMonitor(seed=2).state_key != key
    assert SensitivityMonitor(seed=1, post_hoc=True).state_key != key


def test_a_process_without_rows_gathers_the_others_rows() -> None:
    """The DDP corner case, with torchmetrics' gather replaced by one that adds a second
    process's states, in the order the metric declares them: this process saw no rows, the
    other two samples with scores of width 3."""
    other = iter(
        [
            torch.tensor([7.0, 9.0], dtype=torch.float64),  # ids
            torch.tensor(1.0, dtype=torch.float64),  # ids' width
            torch.arange(6, dtype=torch.float64),  # scores, flat
            torch.tensor(3.0, dtype=torch.float64),  # scores' width
        ]
    )

    def gather(tensor: torch.Tensor, group: object = None) -> list[torch.Tensor]:
        if tensor.dim() > 0:  # this process's rows: none, in a tensor that fits the other's
            assert tensor.numel() == 0
            assert tensor.dtype == torch.float64
        return [tensor, next(other)]

    rows = Samples(
        {"ids": torch.long, "scores": torch.float64},
        dist_sync_fn=gather,
        distributed_available_fn=lambda: True,
    )
    found = rows.gathered()
    assert next(other, None) is None  # every state was gathered
    assert found is not None
    assert found["ids"].tolist() == [7, 9]
    assert found["ids"].dtype == torch.long
    assert found["scores"].tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]


def test_the_first_epoch_leaves_a_samples_evidence_once_a_later_epoch_scored_it() -> None:
    """The first epoch's scores are the untrained network's: a sample's evidence keeps them only
    until a later epoch scores it (here sample 5 is left out of the second epoch), also across
    a checkpoint saved between the two."""
    tracker = SensitivityTracker(MonitorConfig())
    labels = torch.arange(10) % K
    first, second, third = (_logits(10, seed).log_softmax(-1).neg() for seed in (1, 2, 3))
    tracker.fold(torch.arange(10), labels, first)
    assert tracker.evidence is not None
    assert torch.equal(tracker.evidence.mean, first)
    resumed = SensitivityTracker(MonitorConfig())
    resumed.load_state_dict(tracker.state_dict())
    for t in (tracker, resumed):
        later = torch.arange(10) != 5
        t.fold(torch.arange(10)[later], labels[later], second[later])
        assert t.evidence is not None
        expected = torch.where(later.unsqueeze(-1), second, first)
        torch.testing.assert_close(t.evidence.mean, expected, rtol=1e-14, atol=1e-14)
        assert t.evidence.seen.tolist() == [1] * 10
        assert t.first is not None
        assert t.first.ids.tolist() == [5]
        t.fold(torch.arange(10), labels, third)
        both = torch.where(later.unsqueeze(-1), (second + third) / 2, third)
        torch.testing.assert_close(t.evidence.mean, both, rtol=1e-14, atol=1e-14)
        assert t.first is None
