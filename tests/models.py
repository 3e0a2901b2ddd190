"""Tiny models that exercise every Gram route of the engine, with inputs to match.

Sizes are chosen so that some layers have fewer parameters than K − 1 (rank-deficient, where FI
is informative) and others more (full rank, where FI equals the closed form).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn


class Affine(nn.Module):
    """A custom layer the engine has no special route for (torch.func fallback)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, channels).reshape(1, channels, 1, 1))
        self.shift = nn.Parameter(torch.linspace(-0.2, 0.3, channels).reshape(1, channels, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x * self.gain + self.shift)


class BasicBlock(nn.Module):
    """Residual block with in-place ReLU and in-place addition, as in torchvision's ResNet."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class SequenceModel(nn.Module):
    """Embedding + LayerNorm + per-token Linear + GroupNorm over a Conv1d: token ids in."""

    def __init__(self, vocab: int = 7, dim: int = 4, classes: int = 5) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.norm = nn.LayerNorm(dim)
        self.token = nn.Linear(dim, dim)
        self.conv = nn.Conv1d(dim, 4, 3, padding="same", padding_mode="circular")
        self.group = nn.GroupNorm(2, 4)
        self.head = nn.Linear(4, classes)

    def forward(self, idx: Tensor) -> Tensor:
        h = torch.tanh(self.token(self.norm(self.embed(idx))))  # (B, T, dim)
        # GroupNorm right after the conv would make the conv's channel scalings (nearly) null
        # directions; the tanh in between keeps every family well-conditioned for the tests.
        h = self.group(torch.tanh(self.conv(h.transpose(1, 2))))  # (B, 4, T)
        return self.head(h.mean(-1))


@dataclass(frozen=True)
class Case:
    """A model factory with matching inputs and labels (float64, deterministic)."""

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int], Tensor]
    classes: int


def _randomise_norm_stats(model: nn.Module) -> nn.Module:
    """Give BatchNorm layers non-trivial running statistics and affine parameters."""
    generator = torch.Generator().manual_seed(3)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            n = module.num_features
            module.running_mean.copy_(0.3 * torch.randn(n, generator=generator))
            module.running_var.copy_(0.5 + torch.rand(n, generator=generator))
            module.weight.data.copy_(1.0 + 0.3 * torch.randn(n, generator=generator))
            module.bias.data.copy_(0.2 * torch.randn(n, generator=generator))
    return model


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2), nn.Tanh(), nn.Linear(2, 6))


def cnn_bn() -> nn.Module:
    return _randomise_norm_stats(
        nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1),
            nn.BatchNorm2d(3),
            nn.ReLU(),
            nn.Conv2d(3, 4, 3, stride=2, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(4 * 3 * 3, 6),
        )
    )


def resnet() -> nn.Module:
    return _randomise_norm_stats(
        nn.Sequential(
            nn.Conv2d(1, 3, 3, padding=1, bias=False),
            nn.BatchNorm2d(3),
            nn.ReLU(inplace=True),
            BasicBlock(3),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(3, 5),
        )
    )


def grouped() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, groups=2),
        nn.Tanh(),
        nn.Conv2d(4, 4, 3, groups=4, padding=1, padding_mode="reflect"),  # depthwise
        nn.Tanh(),
        nn.Conv2d(4, 2, 1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(2 * 5 * 5, 6),
    )


def custom() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 2),
        Affine(3),
        nn.PReLU(3),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 5),
    )


def _images(channels: int, size: int) -> Callable[[int], Tensor]:
    return lambda batch: torch.randn(
        batch, channels, size, size, generator=torch.Generator().manual_seed(11)
    )


def _tokens(batch: int) -> Tensor:
    return torch.randint(0, 7, (batch, 6), generator=torch.Generator().manual_seed(11))


CASES = [
    Case("mlp", mlp, lambda b: torch.randn(b, 6, generator=torch.Generator().manual_seed(11)), 6),
    Case("cnn_bn", cnn_bn, _images(2, 6), 6),
    Case("resnet", resnet, _images(1, 5), 5),
    Case("grouped", grouped, _images(2, 5), 6),
    Case("sequence", SequenceModel, _tokens, 5),
    Case("custom", custom, _images(2, 5), 5),
]


def build(case: Case, batch: int = 3, seed: int = 0) -> tuple[nn.Module, Tensor, Tensor]:
    """The case's model in float64 (training mode, as a user would hand it over), inputs, labels."""
    torch.manual_seed(seed)
    model = case.build().double().train()
    x = case.inputs(batch)
    if x.is_floating_point():
        x = x.double()
    labels = torch.arange(batch) % case.classes
    return model, x, labels
