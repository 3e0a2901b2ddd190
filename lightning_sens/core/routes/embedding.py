"""Embedding layers: out[t] = W[token_t] (docs/engine.md, "Layer routes").

The per-sample gradient of row v is the sum of the backprops at the positions holding token v,
so ⟨∂_k, ∂_l⟩ = Σ_{t,s: token_t = token_s} ⟨g_k[t], g_l[s]⟩, computed from the backprops without
forming the (vocabulary × dim) gradient. Calls of a shared embedding are concatenated along the
positions; ``padding_idx`` rows receive no gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_sens.core.routes.base import Features, LayerGram, Route, RouteResult

__all__ = ["EmbeddingRoute"]


class EmbeddingRoute(Route):
    """``nn.Embedding`` (without ``max_norm``, which rewrites the weight during the forward)."""

    method = "embedding"

    def prepare(self) -> None:
        calls = self.calls
        self.tokens = torch.cat([call.x.reshape(call.x.shape[0], -1) for call in calls], dim=1)
        padding = getattr(self.module, "padding_idx", None)
        # autograd gives the padding row no gradient (F.embedding's convention); so do we
        self.valid = self.tokens != padding if padding is not None else None
        self.features = Features(self.num_cotangents, axis=1)  # (B, T, K', d)
        self.channels: list[Tensor] = []

    def add(self, backprops: list[Tensor]) -> None:
        B = self.tokens.shape[0]
        g = torch.cat([g.to(self.dtype).reshape(B, -1, g.shape[-1]) for g in backprops], dim=1)
        if self.valid is not None:
            g = g * self.valid.unsqueeze(-1).to(self.dtype)
        self.features.put(g)  # (B, T, d)
        out = torch.cat(
            [c.output.to(self.dtype).reshape(B, -1, g.shape[-1]) for c in self.calls], dim=1
        )
        self.channels.append((g * out).sum(1))

    def result(self) -> RouteResult:
        same = (self.tokens.unsqueeze(2) == self.tokens.unsqueeze(1)).to(torch.float64)
        found = self.features.buffer
        assert found is not None  # at least one cotangent was added
        mixed = same @ found.flatten(2)  # (B, T, K'·d)
        gram = torch.einsum("btkd,btld->bkl", found, mixed.view(found.shape))
        channel = torch.stack(self.channels, dim=1).to(torch.float64)  # (B, K', d)
        layer = LayerGram(gram, channel.sum(-1), channel, "embedding", self.theta_norm2())
        return RouteResult({self.name: layer}, gram)
