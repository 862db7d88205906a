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
    "invalid_mask",
    "layer_median",
]

#: How many standard deviations of the normalised input a channel's negative β must cover to
#: count as always dead: γ·x̂ + β > 0 then needs x̂ > 6, which BN-normalised inputs do not reach.
DEAD_MARGIN_Z = 6.0


def layer_median(magnitude: torch.Tensor) -> torch.Tensor:
    """The median of a layer's finite values: one NaN or Inf channel must not switch the
    relative test off (NaN median) or on (Inf median) for the whole layer."""
    finite = magnitude[torch.isfinite(magnitude)]
    return finite.median() if finite.numel() else magnitude.new_tensor(float("nan"))


def _small(values: torch.Tensor, t: Thresholds) -> torch.Tensor:
    magnitude = values.abs()
    return (magnitude < t.abs_tol) | (magnitude < t.rel_tol * layer_median(magnitude))


def abnormal_mask(gamma: torch.Tensor, beta: torch.Tensor, t: Thresholds) -> torch.Tensor:
    """Both |γ_k| and |β_k| far smaller than the rest of the layer (the paper's abnormal pair).

    NaN compares false, so a non-finite channel is never abnormal: :func:`invalid_mask` has it.
    """
    g, b = gamma.abs(), beta.abs()
    absolute = (g < t.abs_tol) & (b < t.abs_tol)
    relative = (g < t.rel_tol * layer_median(g)) & (b < t.rel_tol * layer_median(b))
    return absolute | relative


def always_dead_mask(gamma: torch.Tensor, beta: torch.Tensor, t: Thresholds) -> torch.Tensor:
    """Negligible γ and β ≤ 0 with room to spare: the output is ≤ 0 whatever the input.

    The margin ``|γ|·z ≤ −β`` keeps a channel with tiny γ but tinier β (which is positive for
    half its inputs) out, and lets γ = β = 0 (output exactly 0) in.
    """
    return _small(gamma, t) & (beta <= 0) & (gamma.abs() * DEAD_MARGIN_Z <= -beta)


def collapsed_mask(running_var: torch.Tensor, t: Thresholds) -> torch.Tensor:
    """Stored running variance ~0: the channel's input never varied during pretraining.

    A negative variance is not a small one but an impossible one: :func:`invalid_mask`.
    """
    return (running_var >= 0) & (running_var < t.var_tol)


def invalid_mask(
    gamma: torch.Tensor, beta: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor
) -> torch.Tensor:
    """Channels whose stored tensors no BatchNorm can hold: NaN or Inf anywhere, or a negative
    running variance. Their outputs are NaN or meaningless, so they count as unusable."""
    finite = (
        torch.isfinite(gamma)
        & torch.isfinite(beta)
        & torch.isfinite(running_mean)
        & torch.isfinite(running_var)
    )
    return ~finite | (running_var < 0)


def indices(mask: torch.Tensor) -> list[int]:
    return mask.nonzero().flatten().tolist()


def zero_layer(weight: torch.Tensor, bias: torch.Tensor) -> bool:
    """γ = β = 0 on every channel: a design (a zero-initialised residual branch starts as the
    identity) or an untrained file, not channels that died in pretraining; scan and repair
    leave such a layer's channels unflagged."""
    return bool((weight == 0).all()) and bool((bias == 0).all())
