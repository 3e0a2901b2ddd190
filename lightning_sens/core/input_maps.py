"""Input FI from the backprops to the perturbed input: the whole input, window maps, positions.

Window Grams are sums of per-position outer products, so one pooling of the products g_k ⊙ g_l
gives every window of a size at once (docs/engine.md, "Input maps").
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_sens.core.fi import BlockFI, fi_from_contrast_columns, fi_from_contrast_gram
from lightning_sens.core.frame import MetricFrame, metric_frame
from lightning_sens.core.results import InputFI

__all__ = ["Layout", "input_result", "layout_of"]

Layout = Literal["image", "sequence", "flat"]


def layout_of(shape: tuple[int, ...], from_tokens: bool) -> Layout:
    """How maps read a perturbed input of per-batch shape ``shape``.

    ``"image"``: ``(B, C, H, W)``; ``"sequence"``: an embedded token sequence ``(B, T, d)``
    (channels last); ``"flat"``: anything else (whole-input FI only).
    """
    if len(shape) == 4 and not from_tokens:
        return "image"
    if len(shape) == 3 and from_tokens:
        return "sequence"
    return "flat"


def _window_grams(planes: Tensor, window: tuple[int, int], K1: int) -> Tensor:
    """Window Grams from per-position products of the upper triangle of pairs (k ≤ l).

    Args:
        planes: ``(B, C, P, H, W)`` with P = K'(K'+1)/2 products g_k ⊙ g_l per position.
        window: ``(h, w)``, odd; each position's window is summed, zero outside the input.

    Returns:
        ``(B, C, H, W, K', K')`` symmetric Grams.
    """
    B, C, P, H, W = planes.shape
    if window != (1, 1):
        flat = planes.reshape(B, C * P, H, W)
        padding = (window[0] // 2, window[1] // 2)
        flat = F.avg_pool2d(flat, window, stride=1, padding=padding, divisor_override=1)
        planes = flat.reshape(B, C, P, H, W)
    rows, cols = torch.triu_indices(K1, K1, device=planes.device)
    grams = planes.new_empty(B, C, H, W, K1, K1)
    packed = planes.permute(0, 1, 3, 4, 2)
    grams[..., rows, cols] = packed
    grams[..., cols, rows] = packed
    return grams


def _window_columns(grads: Tensor, window: tuple[int, int]) -> Tensor:
    """Every window's Jacobian columns: ``(K', B, C, H, W)`` → ``(B, C, H, W, K', h·w)``.

    Positions outside the input are zero columns (the window is clipped at the borders).
    """
    K1, B, C, H, W = grads.shape
    planes = grads.reshape(K1 * B * C, 1, H, W)
    padding = (window[0] // 2, window[1] // 2)
    patches = F.unfold(planes, window, padding=padding)  # (K'BC, h·w, H·W)
    patches = patches.reshape(K1, B, C, -1, H, W)
    return patches.permute(1, 2, 4, 5, 0, 3)


def input_result(
    grads: Tensor,
    probs: Tensor,
    c: Tensor,
    windows: tuple[int, ...],
    rtol: float,
    layout: Layout,
    source: str,
    frame: MetricFrame | None = None,
) -> InputFI:
    """Input FI of every family from the backprops ``(K', B, *shape)`` to the perturbed input.

    Also the per-coordinate metric diagonal J_iᵀ H J_i and gradient ∂ log p_y/∂x_i, from the
    same backprops (``frame``: the samples' :class:`MetricFrame`, computed here if None).
    """
    grads = grads.to(torch.float64)
    frame = metric_frame(probs, c) if frame is None else frame
    per_sample = grads.transpose(0, 1)  # (B, K', *shape)
    metric_map, gradient = frame.columns(per_sample), frame.slope(per_sample)
    whole_gram = torch.einsum("kbn,lbn->bkl", grads.flatten(2), grads.flatten(2))
    whole = fi_from_contrast_gram(whole_gram, probs, c, rtol)
    if layout == "flat" or not windows:
        return InputFI(
            whole=whole,
            maps={},
            position_map=None,
            source=source,
            metric_map=metric_map,
            gradient=gradient,
        )
    if layout == "sequence":  # (K', B, T, d) -> channels first, one row: (K', B, d, 1, T)
        grads = grads.movedim(-1, 2).unsqueeze(3)
    columns = grads.permute(1, 3, 4, 0, 2)  # (B, H, W, K', C): one position's channels
    position = fi_from_contrast_columns(columns, probs[:, None, None], c[:, None, None], rtol)
    maps_probs, maps_c = probs[:, None, None, None], c[:, None, None, None]
    maps = {}
    if 1 in windows:
        single = columns.permute(0, 4, 1, 2, 3).unsqueeze(-1)  # (B, C, H, W, K', 1)
        maps[1] = fi_from_contrast_columns(single, maps_probs, maps_c, rtol)
    K1 = grads.shape[0]
    shapes = {w: (1, w) if layout == "sequence" else (w, w) for w in windows if w > 1}
    # A window of fewer coordinates than K' keeps its columns: FI then comes from a QR of the
    # columns themselves, whose accuracy does not suffer from the Gram's squared condition.
    few = [w for w, (h, v) in shapes.items() if h * v < K1]
    for w in few:
        maps[w] = fi_from_contrast_columns(
            _window_columns(grads, shapes[w]), maps_probs, maps_c, rtol
        )
    many = [w for w in shapes if w not in few]
    if many:
        rows, cols = torch.triu_indices(K1, K1, device=grads.device)
        planes = (grads[rows] * grads[cols]).transpose(0, 1).transpose(1, 2)  # (B, C, P, H, W)
        for w in many:
            window_grams = _window_grams(planes.contiguous(), shapes[w], K1)
            maps[w] = fi_from_contrast_gram(window_grams, maps_probs, maps_c, rtol)
    if layout == "sequence":  # back to (B, T, d) and (B, T)
        maps = {w: _token_layout(block) for w, block in maps.items()}
        position = BlockFI(
            position.fi[:, 0], position.relative_fi[:, 0], position.effective_rank[:, 0]
        )
    return InputFI(
        whole=whole,
        maps={w: maps[w] for w in windows},
        position_map=position,
        source=source,
        metric_map=metric_map,
        gradient=gradient,
    )


def _token_layout(block: BlockFI) -> BlockFI:
    """``(B, d, 1, T)`` maps of a token sequence back to the embedding's ``(B, T, d)``."""
    return BlockFI(
        block.fi[:, :, 0].transpose(1, 2),
        block.relative_fi[:, :, 0].transpose(1, 2),
        block.effective_rank[:, :, 0].transpose(1, 2),
    )
