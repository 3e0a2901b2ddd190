"""Bad input gets an error that names the problem and the way out."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from lightning_sens import closed_form_fi, fi_from_gram, input_fi, parameter_fi, sensitivity
from tests.models import CASES, build


class Returns(nn.Module):
    """A model whose forward returns whatever ``make`` builds from the logits of a Linear."""

    def __init__(self, make, classes: int = 4) -> None:
        super().__init__()
        self.linear = nn.Linear(3, classes).double()
        self.make = make

    def forward(self, x: Tensor):
        return self.make(self.linear(x))


X = torch.randn(2, 3, dtype=torch.float64)
Y = torch.tensor([0, 1])


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda z: (z, z), TypeError, "returned tuple.*forward_fn"),
        (lambda z: z.unsqueeze(-1), ValueError, r"shape \(B, K\).*\(2, 4, 1\).*forward_fn"),
        (lambda z: z[:, :0], ValueError, "K >= 2.*K = 0"),  # (B, 1): one binary logit
        (lambda z: z.argmax(-1, keepdim=True).expand(2, 4), TypeError, "floating-point logits"),
        (
            lambda z: z * torch.tensor([1.0, float("nan")], dtype=z.dtype)[:, None],
            ValueError,
            r"NaN or Inf for samples \[1\]",
        ),
        (
            lambda z: z + torch.tensor([float("inf"), 0.0], dtype=z.dtype)[:, None],
            ValueError,
            r"NaN or Inf for samples \[0\]",
        ),
    ],
)
def test_outputs_that_are_not_logits(make, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        sensitivity(Returns(make), X, Y)


def test_labels_out_of_range_or_mis_shaped() -> None:
    model = Returns(lambda z: z)
    with pytest.raises(ValueError, match=r"labels \[4\] outside \[0, 4\)"):
        sensitivity(model, X, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match=r"labels \[-1\]"):
        sensitivity(model, X, torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match=r"shape \(B,\) = \(2,\)"):
        sensitivity(model, X, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"float values \[2\].*0 or 1"):
        sensitivity(model, X, torch.tensor([0.0, 2.0]))  # floats: the 0/1 labels of a binary model
    with pytest.raises(ValueError, match="'pred'"):
        sensitivity(model, X, "predicted")  # type: ignore[arg-type]


def test_empty_batch() -> None:
    model = Returns(lambda z: z)
    with pytest.raises(ValueError, match="non-empty batch"):
        sensitivity(model, X[:0], Y[:0])
    with pytest.raises(ValueError, match="empty"):
        closed_form_fi(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))


def test_windows() -> None:
    model, x, labels = build(CASES[1])  # 6 × 6 images
    with pytest.raises(ValueError, match=r"Window size 7 is larger than the 6×6 image"):
        input_fi(model, x, labels, windows=(1, 7))
    with pytest.raises(ValueError, match=r"odd positive integers.*got 2"):
        input_fi(model, x, labels, windows=(2,))
    with pytest.raises(ValueError, match="odd positive integers"):
        input_fi(model, x, labels, windows=(0,))
    with pytest.raises(ValueError, match="must not repeat"):
        input_fi(model, x, labels, windows=(3, 3))


def test_options() -> None:
    model, x, labels = build(CASES[1])
    with pytest.raises(ValueError, match=r"chunk_size must be a positive integer.*got 0"):
        sensitivity(model, x, labels, chunk_size=0)
    with pytest.raises(ValueError, match=r"rtol must lie in \(0, 1\), got 2"):
        sensitivity(model, x, labels, rtol=2.0)
    with pytest.raises(ValueError, match="backward must be 'auto', 'batched' or 'loop'"):
        sensitivity(model, x, labels, backward="vmap")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"'nope'.*Choose among"):
        parameter_fi(model, x, labels, layers=["nope"])
    with pytest.raises(TypeError, match="sequence of module names"):
        parameter_fi(model, x, labels, layers="0")


def test_token_inputs_without_an_embedding_reading_them() -> None:
    """Input FI of token ids needs the embedding that reads them; without one, a way out."""

    class Onehot(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(6 * 7, 5).double()

        def forward(self, ids: Tensor) -> Tensor:
            return self.head(nn.functional.one_hot(ids, 7).double().flatten(1))

    _, tokens, labels = build(CASES[4])
    with pytest.warns(UserWarning, match="input_module="):
        result = sensitivity(Onehot(), tokens, labels, windows=(1, 3))
    assert result.input is None
    assert result.parameters is not None
    with pytest.raises(TypeError, match="input_module="), pytest.warns(UserWarning, match="none"):
        input_fi(Onehot(), tokens, labels, windows=(1, 3))
    with pytest.raises(ValueError, match=r"input_module 'embd'.*did you mean \['embed'\]"):
        input_fi(build(CASES[4])[0], tokens, labels, windows=(1,), input_module="embd")
    with pytest.raises(ValueError, match="longer than the sequence of 6 tokens"):
        input_fi(build(CASES[4])[0], tokens, labels, windows=(1, 7))


def test_layer_selection_by_name_and_pattern() -> None:
    model, x, labels = build(CASES[2])  # resnet: 0, 1, 3.conv1, 3.bn1, 3.conv2, 3.bn2, 6
    kept = parameter_fi(model, x, labels, exclude_layers=["3.*", "1"]).layers
    assert set(kept) == {"0", "6"}
    with pytest.raises(ValueError, match=r"exclude_layers holds '4\.\*'.*Choose among"):
        parameter_fi(model, x, labels, exclude_layers=["4.*"])
    with pytest.raises(TypeError, match=r"exclude_layers must be a sequence.*\['3\.\*'\]"):
        parameter_fi(model, x, labels, exclude_layers="3.*")
    with pytest.raises(ValueError, match=r"'3.conv'.*Did you mean \['3.conv[12]', '3.conv[12]'"):
        parameter_fi(model, x, labels, layers=["3.conv"])


def test_batchnorm_without_running_stats_is_refused() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False)).double()
    with pytest.raises(ValueError, match="track_running_stats=False"):
        parameter_fi(model, X, Y)


def test_gram_shape() -> None:
    p = torch.full((3,), 1 / 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"\(\.\.\., K, K\)"):
        fi_from_gram(torch.zeros(3, 2, dtype=torch.float64), p, p)
