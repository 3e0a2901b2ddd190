"""Flag rules, persistence, summaries and the flag table (pure parts of the monitor)."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import pytest
import torch

from lightning_sens.flagging import FlagHistory, flag, robust_z
from lightning_sens.label_noise import label_log_fi
from lightning_sens.reporting.stats import log_fi_summary
from lightning_sens.reporting.tables import COLUMNS, FlagRow, write_table


def test_robust_z_matches_its_definition() -> None:
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0], dtype=torch.float64)
    median, mad = 3.0, 1.0  # |x − 3| = 2, 1, 0, 1, 97 → MAD = 1
    torch.testing.assert_close(robust_z(x), (x - median) / (1.4826 * mad))


def test_robust_z_ties_and_non_finite_values() -> None:
    tied = torch.tensor([0.0, 0.0, 0.0, 0.0, 5.0], dtype=torch.float64)
    z = robust_z(tied)  # MAD = 0: mean absolute deviation (1.0) takes over
    torch.testing.assert_close(z, tied / 1.2533)
    assert torch.equal(robust_z(torch.zeros(4)), torch.zeros(4, dtype=torch.float64))
    z = robust_z(torch.tensor([float("-inf"), 1.0, 2.0, 3.0, float("inf")]))
    assert z[0] == float("-inf")
    assert z[-1] == float("inf")


def test_mad_rule_flags_the_outliers_only() -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(200, generator=g, dtype=torch.float64)
    scores[[7, 42]] = torch.tensor([9.0, 12.0], dtype=torch.float64)
    decision = flag(scores, "mad", threshold=3.5)
    assert decision.flagged.nonzero().flatten().tolist() == [7, 42]
    assert decision.rule == "mad>3.5"
    assert scores[~decision.flagged].max() <= decision.cutoff[0] < 9.0


def test_top_k_rule() -> None:
    scores = torch.tensor([0.5, 3.0, -1.0, 2.0])
    decision = flag(scores, "top_k", top_k=2)
    assert decision.flagged.tolist() == [False, True, False, True]
    assert (decision.cutoff == 2.0).all()
    assert flag(scores, "top_k", top_k=10).flagged.all()
    rules = "'counterfactual', 'counterfactual_pairs', 'mad', 'top_k'"
    with pytest.raises(ValueError, match=rules):
        flag(scores, "zscore")  # type: ignore[arg-type]


def test_a_class_the_model_does_not_separate_is_undecided_not_flagged() -> None:
    """Two classes of 12 validation samples. Class 0 scores 3 of its samples above the median
    of what a wrong label 0 looks like: an estimate of 6 wrong labels, exactly half the class,
    which the rule as it was accepted (it flagged 6 correct labels with p_bad 1). The model does
    not separate the class (p ≈ 0.2): the decision flags none, and says which classes it could
    not decide; a subset keeps that."""
    reference = torch.arange(1.0, 13.0, dtype=torch.float64)  # class 1 under label 0
    own = torch.tensor([0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 5.6, 5.7, 5.8, 7.5, 9.5, 11.5])
    under_0 = torch.cat([own.double(), reference])
    scores = torch.stack([under_0, -under_0], dim=1)  # log FI under labels 0 and 1
    labels = torch.arange(2).repeat_interleave(12)
    cells = {
        "counterfactual": [[True], [True]],
        "counterfactual_pairs": [[True, True], [True, True]],
    }
    for rule, undecided_cells in cells.items():  # with pairs, the cell (k, k) is the pooled part
        decision = flag(under_0, rule, label_scores=scores, labels=labels)  # type: ignore[arg-type]
        assert not decision.flagged.any()
        assert decision.p_bad.isnan().all()
        assert decision.undecided is not None
        assert decision.undecided.tolist() == [True, True]
        assert decision.undecided_classes == [0, 1]
        assert decision.estimated is not None
        assert decision.estimated.tolist() == [-1, -1]
        assert decision.estimated_share == 0.0
        part = decision.take(torch.tensor([3, 20]))
        assert part.undecided_classes == [0, 1]
        assert part.undecided_cells is not None
        assert part.undecided_cells.tolist() == undecided_cells


def test_a_separated_class_is_decided_and_the_other_rules_decide_everything() -> None:
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(3).repeat_interleave(20)
    logits = torch.randn(60, 3, generator=g, dtype=torch.float64)
    logits[torch.arange(60), labels] += 6.0  # the model knows every class
    scores = label_log_fi(logits)
    own = scores[torch.arange(60), labels]
    decision = flag(own, label_scores=scores, labels=labels)
    assert decision.undecided is not None
    assert decision.undecided_classes == []
    assert not decision.flagged.any()  # every label right: nothing to flag
    for rule in ("mad", "top_k"):
        other = flag(own, rule)  # type: ignore[arg-type]
        assert other.undecided is None
        assert other.undecided_classes == []


def test_persistence_counts_the_last_n_monitored_epochs() -> None:
    history = FlagHistory(window=3)
    for epoch, flagged in enumerate([[1, 2], [1], [1, 3], [1, 3]]):
        history.update("val", epoch, flagged)
    assert history.count("val", 1) == 3  # epochs 1, 2, 3
    assert history.count("val", 2) == 0  # flagged only in epoch 0, outside the window
    assert history.count("val", 3) == 2
    history.update("val", 3, [2])  # a repeated epoch (resume) changes nothing
    assert history.count("val", 2) == 0
    restored = FlagHistory.from_state_dict(history.state_dict())
    assert restored.count("val", 3) == 2
    assert restored.window == 3


def test_summary_statistics() -> None:
    x = torch.arange(101, dtype=torch.float64)  # quantile q% is q
    summary = log_fi_summary(torch.cat([x, torch.tensor([float("-inf")], dtype=torch.float64)]))
    assert summary["median"] == 50.0
    assert summary["mean"] == 50.0
    assert [summary[f"q{q}"] for q in (75, 90, 99, 100)] == [75.0, 90.0, 99.0, 100.0]
    assert all(math.isnan(v) for v in log_fi_summary(torch.tensor([float("-inf")])).values())


def test_flag_table_is_written_atomically_and_reads_back(tmp_path: Path) -> None:
    row = FlagRow(
        3,
        "val",
        2,
        64,
        1,
        0,
        0.25,
        3.0,
        math.log(3.0),
        1.0,
        9,
        0.5,
        4,
        True,
        0.75,
        2,
        "mad>3.5",
        1.5,
    )
    path = tmp_path / "sensitivity" / "flags.csv"
    written = write_table([row, row], path)
    assert path in written
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []  # no temp files
    with path.open() as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == COLUMNS
    assert float(rows[0]["log_fi"]) == math.log(3.0)  # full precision
    assert rows[0]["flagged"] == "True"


def test_table_writer_writes_what_the_csv_module_writes(tmp_path: Path) -> None:
    """The column-wise writer (fast enough for the training set every epoch) against csv.writer
    on the awkward values: quotes, commas, newlines, None, -0.0, nan, inf, bools, big ints."""
    columns = {
        "name": ["a,b", 'say "hi"', "two\nlines", "plain"],
        "x": [-0.0, float("nan"), float("-inf"), 0.1 + 0.2],
        "mixed": [None, 1.5, "t", 2],
        "flag": [True, False, True, False],
        "n": [2**70, -1, 0, 7],
        "numbers": [1, 1.0, True, 1],  # equal as dict keys, not as text
        "repeated": [0.5] * 4,
    }
    path = tmp_path / "t.csv"
    write_table(columns, path, list(columns))
    expected = io.StringIO(newline="")
    writer = csv.writer(expected)
    writer.writerow(list(columns))
    writer.writerows(zip(*columns.values(), strict=True))
    assert path.read_bytes() == expected.getvalue().encode()
