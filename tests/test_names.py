"""One name per quantity, flags that say what they do, grouped exports and small modules."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch

import lightning_sens
import lightning_sens.core
import lightning_sens.reference
from lightning_sens import BlockFI, ClosedFormFI, SensitivityResult, sensitivity
from tests.checks import NOT_IN_REFERENCE, assert_same_fields
from tests.models import CASES, build

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("case", ["cnn_bn", "sequence"])
def test_input_maps_false_keeps_the_whole_input_and_inputs_false_drops_input_fi(
    case: str,
) -> None:
    model, x, labels = build(next(c for c in CASES if c.name == case))
    full = sensitivity(model, x, labels, windows=(1, 3))
    whole_only = sensitivity(model, x, labels, windows=(1, 3), input_maps=False)
    none = sensitivity(model, x, labels, windows=(1, 3), inputs=False)
    assert full.input is not None
    assert whole_only.input is not None
    assert set(full.input.maps) == {1, 3}
    assert full.input.position_map is not None
    # the whole input is the same family with or without the maps
    assert torch.equal(whole_only.input.whole.fi, full.input.whole.fi)
    assert torch.equal(whole_only.input.whole.effective_rank, full.input.whole.effective_rank)
    assert torch.equal(whole_only.input.whole.relative_fi, full.input.whole.relative_fi)
    assert whole_only.input.source == full.input.source
    # what only exists with maps is empty or None; the per-coordinate fields stay
    assert whole_only.input.maps == {}
    assert whole_only.input.position_map is None
    assert whole_only.input.metric_map is not None
    assert full.input.metric_map is not None
    assert torch.equal(whole_only.input.metric_map, full.input.metric_map)
    assert whole_only.input.gradient is not None
    assert full.input.gradient is not None
    assert torch.equal(whole_only.input.gradient, full.input.gradient)
    # no input FI at all; the rest of the result is unchanged
    assert none.input is None
    assert none.parameters is not None
    assert full.parameters is not None
    assert torch.equal(none.parameters.whole.fi, full.parameters.whole.fi)
    assert torch.equal(none.log_fi_max, full.log_fi_max)


def test_windows_are_not_checked_without_maps() -> None:
    model, x, labels = build(CASES[1])
    with pytest.raises(ValueError, match="odd positive"):
        sensitivity(model, x, labels, windows=(2,))
    sensitivity(model, x, labels, windows=(2,), input_maps=False)  # no maps: no window to check
    sensitivity(model, x, labels, windows=(2,), inputs=False)


def test_closed_forms_and_results_share_their_field_names() -> None:
    """ClosedFormFI holds three of SensitivityResult's quantities, under the same names."""
    closed = {f.name for f in dataclasses.fields(ClosedFormFI)}
    assert closed == {"target", "p_target", "log_fi_max"}
    assert closed <= {f.name for f in dataclasses.fields(SensitivityResult)}


def _blocks(scale: float = 1.0) -> BlockFI:
    return BlockFI(
        torch.tensor([0.5, 2.0], dtype=torch.float64) * scale,
        torch.tensor([0.25, 1.0], dtype=torch.float64),
        torch.tensor([1, 2]),
    )


def test_the_field_by_field_comparison_can_fail() -> None:
    assert_same_fields("same", _blocks(), _blocks())
    with pytest.raises(pytest.fail.Exception, match=r"changed\.fi"):
        assert_same_fields("changed", _blocks(), _blocks(1 + 1e-6))
    rank32 = dataclasses.replace(_blocks(), effective_rank=torch.tensor([1, 2]).int())
    with pytest.raises(AssertionError, match="dtype"):
        assert_same_fields("dtype", _blocks(), rank32)
    with pytest.raises(AssertionError, match="keys"):
        assert_same_fields("maps", {1: _blocks()}, {1: _blocks(), 3: _blocks()})
    with pytest.raises(AssertionError, match="None"):
        assert_same_fields("optional", _blocks(), None)


def test_a_field_added_later_is_compared_unless_exempt() -> None:
    @dataclasses.dataclass(frozen=True)
    class Grown(BlockFI):
        spread: torch.Tensor | None = None

    got = Grown(*dataclasses.astuple(_blocks()), spread=torch.ones(2, dtype=torch.float64))
    want = Grown(*dataclasses.astuple(_blocks()))  # a reference that does not fill it
    with pytest.raises(AssertionError, match=r"grown\.spread"):
        assert_same_fields("grown", got, want)
    assert_same_fields("grown", got, want, exempt={*NOT_IN_REFERENCE, ("Grown", "spread")})


def _exported(module: object) -> list[str]:
    names = module.__all__  # type: ignore[attr-defined]
    assert len(names) == len(set(names)), module
    return names


@pytest.mark.parametrize(
    "module", [lightning_sens, lightning_sens.core, lightning_sens.reference], ids=str
)
def test_exports_resolve_and_are_grouped_under_comments(module: object) -> None:
    for name in _exported(module):
        assert getattr(module, name) is not None, name
    source = Path(module.__file__).read_text()  # type: ignore[attr-defined]
    listing = source[source.index("__all__ = [") : source.index("\n]\n")]
    groups = re.findall(r"\n    # [^\n]+((?:\n    \"\w+\",)+)", listing)
    grouped = [name for group in groups for name in re.findall(r"\"(\w+)\"", group)]
    assert grouped == _exported(module), "every exported name sits under a group comment"
    assert len(groups) >= 3


def test_the_package_exports_everything_the_core_does() -> None:
    assert set(_exported(lightning_sens.core)) <= set(_exported(lightning_sens))


@pytest.mark.parametrize("package", ["core", "reference"])
def test_no_module_of_the_core_or_the_reference_exceeds_400_lines(package: str) -> None:
    folder = ROOT / "lightning_sens" / package
    lengths = {
        str(path.relative_to(folder)): len(path.read_text().splitlines())
        for path in folder.rglob("*.py")
    }
    assert lengths
    assert {name: n for name, n in lengths.items() if n > 400} == {}


def test_the_positions_tables_columns_are_named_once_and_documented() -> None:
    """Every column of a model with many positions has one name, from the per-sample rows to
    the table, and docs/tasks.md (what is scored) and the glossary say what it is."""
    from lightning_sens.core import SampleSummary
    from lightning_sens.reporting.positions import POSITION_COLUMNS, PositionRows

    rows = [f.name for f in dataclasses.fields(PositionRows)]
    flags = ("deviation", "evidence", "flagged", "flagged_recent")  # the decision's, not a row's
    assert ("sample", "split", "epoch", "step", *rows[1:], *flags) == POSITION_COLUMNS
    # a summary field and its column: the same quantity under the glossary's column name
    summary = {f.name for f in dataclasses.fields(SampleSummary)}
    assert summary == {"mean", "upper", "pred_mean", "total", "loss", "accuracy", "count", "worst"}
    tasks = (ROOT / "docs" / "tasks.md").read_text()
    for column in (*rows[1:], *flags):
        assert f"| `{column}` |" in tasks, column
    glossary = (ROOT / "docs" / "method.md").read_text().split("## 8. Glossary", 1)[1]
    for name in ("position_log_fi", "log_fi_mean", "log_fi_upper", "log_fi_total", "wrong_share"):
        assert f"`{name}`" in glossary, name
