"""Static per-channel signals of a BatchNorm layer: pure functions of γ, β and running stats."""

from __future__ import annotations

import torch

from bnfix.thresholds import Thresholds

__all__ = [
    "DEAD_MARGIN_Z",
    "Thresholds",
    "abnormal_mask",
    "always_dead_mask",
    "collapsed_mask",
    "indices",
]

#: How many standard deviations of the normalised input a channel's negative β must cover to
#: count as always dead: γ·x̂ + β > 0 then needs x̂ > 6, which BN-normalised inputs do not reach.
DEAD_MARGIN_Z = 6.0


def _small(values: torch.Tensor, t: Thresholds) -> torch.Tensor:
    magnitude = values.abs()
    return (magnitude < t.abs_tol) | (magnitude < t.rel_tol * magnitude.median())


def abnormal_mask(gamma: torch.Tensor, beta: torch.Tensor, t: Thresholds) -> torch.Tensor:
    """Both |γ_k| and |β_k| far smaller than the rest of the layer (the paper's abnormal pair)."""
    g, b = gamma.abs(), beta.abs()
    absolute = (g < t.abs_tol) & (b < t.abs_tol)
    relative = (g < t.rel_tol * g.median()) & (b < t.rel_tol * b.median())
    return absolute | relative


def always_dead_mask(gamma: torch.Tensor, beta: torch.Tensor, t: Thresholds) -> torch.Tensor:
    """Negligible γ and β ≤ 0 with room to spare: the output is ≤ 0 whatever the input.

    The margin ``|γ|·z ≤ −β`` keeps a channel with tiny γ but tinier β (which is positive for
    half its inputs) out, and lets γ = β = 0 (output exactly 0) in.
    """
    return _small(gamma, t) & (beta <= 0) & (gamma.abs() * DEAD_MARGIN_Z <= -beta)


def collapsed_mask(running_var: torch.Tensor, t: Thresholds) -> torch.Tensor:
    """Stored running variance ~0: the channel's input never varied during pretraining."""
    return running_var < t.var_tol


def indices(mask: torch.Tensor) -> list[int]:
    return mask.nonzero().flatten().tolist()
