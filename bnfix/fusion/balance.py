"""OGM-GE: On-the-fly Gradient Modulation with Generalisation Enhancement (Peng et al., CVPR
2022), as an arm of stage 2.

Per training batch, each modality's score is the sum over the batch of the true-class softmax
probability from its half of the fusion head (features times that half of the weights, plus
half the bias, as the official code splits it, so the two halves' logits add up to the fused
ones). With ``ratio_a = score_a / score_v`` and ``ratio_v = 1 / ratio_a``, the dominant
modality u (ratio_u > 1) gets the coefficient ``k_u = 1 − tanh(α·(ratio_u − 1))``, the other
k = 1. After backward, every gradient of the dominant encoder (all its parameters, not only
the 4-D conv weights the official code touches) becomes ``k_u·g + ε`` with ε Gaussian of
standard deviation std(g) (the generalisation enhancement); the weaker encoder and the head
are left untouched.

Everything stays on the device (no host synchronisation per step); under DDP the two scores
are summed over ranks before the ratio, and the noise is drawn from a generator seeded alike
on every rank, so all ranks apply the same update to the same all-reduced gradients.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

__all__ = ["coefficients", "half_logits", "modulate", "true_class_scores"]


def half_logits(head: nn.Linear, fa: Tensor, fv: Tensor) -> tuple[Tensor, Tensor]:
    """Each modality's half of the fusion head, each with half the bias (they sum to the
    fused logits)."""
    d = fa.shape[1]
    w, b = head.weight, head.bias
    return fa @ w[:, :d].T + b / 2, fv @ w[:, d:].T + b / 2


def true_class_scores(logits_a: Tensor, logits_v: Tensor, y: Tensor) -> Tensor:
    """``[score_a, score_v]``: the summed true-class softmax probabilities of a batch."""
    pa = logits_a.float().softmax(1).gather(1, y[:, None])[:, 0]
    pv = logits_v.float().softmax(1).gather(1, y[:, None])[:, 0]
    return torch.stack([pa.sum(), pv.sum()])


def coefficients(scores: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """``(k_a, k_v)`` from ``[score_a, score_v]``: 1 − tanh(α·(ratio − 1)) for the dominant
    modality (ratio > 1), 1 for the other (and for both when the scores are equal)."""
    ratio_a = scores[0] / scores[1]
    ratio_v = scores[1] / scores[0]
    one = torch.ones_like(ratio_a)
    k_a = torch.where(ratio_a > 1, 1 - torch.tanh(alpha * (ratio_a - 1)), one)
    k_v = torch.where(ratio_v > 1, 1 - torch.tanh(alpha * (ratio_v - 1)), one)
    return k_a, k_v


def modulate(params: Iterable[nn.Parameter], k: Tensor, generator: torch.Generator) -> None:
    """Scale each gradient by ``k`` and, where ``k < 1`` (the dominant encoder), add Gaussian
    noise of that gradient's standard deviation. ``k == 1`` leaves the gradients bit-exact.

    The noise is drawn for every gradient whatever ``k`` is, so the noise stream does not
    depend on which modality dominated earlier batches.
    """
    dominant = (k < 1).to(torch.float32)
    for p in params:
        g = p.grad
        if g is None:
            continue
        std = g.std() if g.numel() > 1 else torch.zeros((), device=g.device, dtype=g.dtype)
        noise = torch.randn(g.shape, generator=generator, device=generator.device, dtype=g.dtype)
        noise = noise.to(g.device, non_blocking=True)
        p.grad = torch.where(dominant > 0, g * k.to(g.dtype) + noise * std, g)
