"""How a steering vector changes the residual stream: add it, or rotate toward it.

The rotation keeps each token's norm, so a push that would blow up the activations of a small
model turns them instead; it needs larger strengths than the additive push for the same effect.
"""

from __future__ import annotations

import torch


def steer(h: torch.Tensor, scale: torch.Tensor, vector: torch.Tensor, operator: str,
           token_mask: torch.Tensor | None = None) -> torch.Tensor:
    delta = scale.to(device=h.device, dtype=h.dtype).view(-1, 1, 1) * vector
    if token_mask is not None:
        delta = delta * token_mask.to(device=h.device, dtype=h.dtype)
    if operator == "additive":
        return h + delta
    # rotation: move toward the vector, then restore each token's norm
    moved = h + delta
    norm_h = h.float().norm(dim=-1, keepdim=True)
    norm_m = moved.float().norm(dim=-1, keepdim=True).clamp_min(1e-6)
    return (moved.float() * (norm_h / norm_m)).to(h.dtype)


def in_span(positions: torch.Tensor, span: tuple[int, int | None]) -> torch.Tensor:
    """Which token ``positions`` a bundle steers, given its ``Manifest.steered_span``
    ``[first, end)`` (``end`` None: to the end of the answer); the Steerer and the serving core
    must mask the same tokens."""
    first, end = span
    inside = positions >= first
    if end is not None:
        inside &= positions < end
    return inside
