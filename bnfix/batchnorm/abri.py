"""The ABRi block for every BatchNorm kind, and the maths it folds into one normalisation.

The paper's block mixes the pretrained BN with a fresh twin, ``y = α·BN_pre(x) + (1−α)·BN_new(x)``.
Both BNs see the same batch statistics in training, so the mix *is* one batch norm with
``γ_eff = αγ_pre + (1−α)γ_new`` and ``β_eff = αβ_pre + (1−α)β_new``; autograd through ``γ_eff`` and
``β_eff`` gives exactly the two-BN gradients. That holds whatever the kind: the normalisation is
the pretrained layer's own (``F.batch_norm``, or SyncBatchNorm's synchronised statistics), and what
the layer runs after normalising (timm's ``drop`` and ``act``) runs once, after the mix. Both BNs'
running statistics follow from the batch statistics that one pass produces (O(C), no second pass
over the activations). In eval mode the block is a per-channel affine map, written as the γ and β
of one BatchNorm that normalises with the pretrained BN's running statistics, so that the forward
is the same single kernel a plain BN runs (and :func:`bnfix.batchnorm.convert.fold` is that map).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnfix.batchnorm.kinds import class_name, kind_of, normalise, refusal, skip_reason, twin_class
from bnfix.errors import BnfixError

Per = Literal["layer", "channel"]
PER_CHOICES: tuple[str, ...] = ("layer", "channel")


class ABRiBatchNorm(nn.Module):
    """``after(α ⊙ BN_pre(x) + (1 − α) ⊙ BN_new(x))`` in one normalisation pass, for any kind.

    ``original`` is the pretrained layer itself, of its own class (BatchNorm1d/2d/3d,
    SyncBatchNorm, timm's BatchNormAct2d with its ``drop`` and ``act``...); ``additional`` is a
    fresh plain BN of the matching class (γ=1, β=0, running mean 0, var 1, same eps and
    momentum); ``alpha`` has shape ``[1]`` per layer or ``[C]`` per channel. State-dict keys:
    ``original.*``, ``additional.*``, ``alpha``. ``after`` is what the original's kind runs after
    normalising (nothing for plain BNs). The kind is looked up from ``original``'s class on
    every forward, so ``nn.SyncBatchNorm.convert_sync_batchnorm`` may run before or after
    :func:`~bnfix.batchnorm.convert.convert`.

    ``ABRiBatchNorm(C)`` builds a pair of ``nn.BatchNorm2d`` (the name ``ABRiBatchNorm2d``, which
    existing code and checkpoints use, is this class); :meth:`from_batchnorm` wraps a layer.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        alpha: float = 0.5,
        per: Per = "layer",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        norm: type[_BatchNorm] = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        check_per(per)
        check_alpha(alpha)
        kw = {"device": device, "dtype": dtype}
        self.original = norm(num_features, eps=eps, momentum=momentum, **kw)
        self.additional = norm(num_features, eps=eps, momentum=momentum, **kw)
        size = 1 if per == "layer" else num_features
        self.alpha = nn.Parameter(torch.full((size,), float(alpha), device=device, dtype=dtype))

    @classmethod
    def from_batchnorm(
        cls, bn: _BatchNorm, alpha: float = 0.5, per: Per = "layer"
    ) -> ABRiBatchNorm:
        """Wrap ``bn`` (the module itself is moved in, not copied) next to a fresh twin."""
        reason = skip_reason(bn) or refusal(type(bn).__name__, bn)
        if reason is not None or not isinstance(bn, _BatchNorm):
            raise BnfixError(f"ABRi cannot take a {class_name(bn)}: {reason or 'not a BatchNorm'}")
        ref = bn.weight
        twin = twin_class(type(bn))
        block = cls(bn.num_features, bn.eps, bn.momentum, alpha, per, ref.device, ref.dtype, twin)
        block.original = bn
        block.train(bn.training)
        return block

    @property
    def per(self) -> Per:
        return "layer" if self.alpha.numel() == 1 else "channel"

    @property
    def num_features(self) -> int:
        return self.original.num_features

    def extra_repr(self) -> str:
        return f"{self.num_features}, per={self.per}"

    def forward(self, x: Tensor) -> Tensor:
        pre = self.original
        kind = kind_of(pre)
        if kind is None:
            raise BnfixError(refusal("the block's original", pre) or "not a BatchNorm")
        pre._check_input_dim(x)
        if self.training:
            y = self._train_forward(x, kind)
        elif pre.running_mean is None or pre.running_var is None:
            # Running statistics hidden (a probe's batch-statistics mode): the training mix,
            # with nothing updated and nothing synchronised.
            weight, bias = self.effective_affine()
            y = normalise(pre, kind, x, None, None, weight, bias, True, 0.0, False)
        else:
            weight, bias = self.eval_affine()
            y = normalise(
                pre, kind, x, pre.running_mean, pre.running_var, weight, bias, False, 0.0, False
            )
        return kind.after(pre, y)

    def eval_affine(self) -> tuple[Tensor, Tensor]:
        """γ, β of one BN that, with the pretrained BN's running statistics, is the block in eval.

        With ``k = γ/√(v+ε)`` per BN, the block maps ``x`` to ``α(k_pre(x − μ_pre) + β_pre) +
        (1 − α)(k_new(x − μ_new) + β_new)``. Writing the twin's term against the pretrained
        statistics, ``x − μ_new = (x − μ_pre) + (μ_pre − μ_new)``, gives one BN over
        ``(μ_pre, v_pre)`` with ``γ = lerp(k_new·√(v_pre+ε), γ_pre, α)`` and
        ``β = lerp(β_new + (μ_pre − μ_new)·k_new, β_pre, α)``. Differentiable in α, γ and β.

        Computed afresh on every eval forward (7 ops of C elements). There is deliberately no
        cache: writes through ``p.data`` (EMA / mean-teacher updates) and ``p.data = ...``
        (``vector_to_parameters``, ``module.to``) change neither a tensor's identity nor its
        version counter, so no cheap key can tell that cached values are still those of the
        weights. Recomputing measured 0.3% of a ResNet-18 eval forward on CPU at batch 8 and 3%
        at batch 1 (README, ``benchmarks/abri_step.py``).
        """
        pre, new = self.original, self.additional
        variances = torch._foreach_add([pre.running_var, new.running_var], pre.eps)
        root_pre, root_new = torch._foreach_sqrt(variances)
        scale_new = new.weight / root_new  # k_new
        weight_new = scale_new * root_pre
        bias_new = torch.addcmul(new.bias, pre.running_mean - new.running_mean, scale_new)
        weight, bias = torch._foreach_lerp(
            [weight_new, bias_new], [pre.weight, pre.bias], [self.alpha, self.alpha]
        )
        return weight, bias

    def effective_affine(self) -> tuple[Tensor, Tensor]:
        """γ_eff, β_eff: the one BN the block is in training mode (differentiable)."""
        pre, new = self.original, self.additional
        # lerp(new, pre, α) = α·pre + (1 − α)·new, one op each
        weight = torch.lerp(new.weight, pre.weight, self.alpha)
        return weight, torch.lerp(new.bias, pre.bias, self.alpha)

    def _train_forward(self, x: Tensor, kind) -> Tensor:
        """One normalisation pass; the block's state changes only once it has succeeded.

        The kernel writes the batch's mean and unbiased variance (synchronised ones for a sync
        kind) into two fresh C-vectors (update factor 1), and both BNs' running statistics
        follow from them with their own factors (``momentum``, or ``1/(batches+1)`` for
        cumulative averaging). A forward that raises (a batch of one, a dtype or device
        mismatch, out of memory in an OOM-retry loop) therefore leaves both BNs' running
        statistics and batch counts as they were, so a retry is the same step as if the failed
        call had never happened.
        """
        pre, new = self.original, self.additional
        weight, bias = self.effective_affine()
        f_pre, f_new = update_factor(pre), update_factor(new)
        batch = pre.running_mean.new_zeros((2, pre.running_mean.shape[0]))
        mean, var = batch[0], batch[1]
        y = normalise(pre, kind, x, mean, var, weight, bias, True, 1.0, True)
        with torch.no_grad():
            stats = [pre.running_mean, pre.running_var, new.running_mean, new.running_var]
            if f_pre == f_new:
                torch._foreach_lerp_(stats, [mean, var, mean, var], f_pre)
            else:
                torch._foreach_lerp_(stats[:2], [mean, var], f_pre)
                torch._foreach_lerp_(stats[2:], [mean, var], f_new)
            torch._foreach_add_([pre.num_batches_tracked, new.num_batches_tracked], 1)
        return y


#: The name existing code and checkpoints use; the block takes every BatchNorm kind.
ABRiBatchNorm2d = ABRiBatchNorm


def check_batch_size(x: Tensor) -> None:
    """Refuse, as ``F.batch_norm`` does in training, an input with one value per channel."""
    if math.prod((x.shape[0], *x.shape[2:])) == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {x.size()}"
        )


def update_factor(bn: _BatchNorm) -> float:
    """The factor this batch updates ``bn``'s running statistics with, as ``_BatchNorm.forward``
    computes it, but without counting the batch yet (that waits for a successful forward)."""
    if bn.momentum is None:
        return 1.0 / (float(bn.num_batches_tracked) + 1.0)
    return float(bn.momentum)


def mix(alpha: Tensor, pre: Tensor, new: Tensor) -> Tensor:
    """``α·pre + (1 − α)·new``: the block's effective γ or β in training mode."""
    return alpha * pre + (1 - alpha) * new


def mixed_statistics(
    alpha: Tensor, mean_pre: Tensor, var_pre: Tensor, mean_new: Tensor, var_new: Tensor
) -> tuple[Tensor, Tensor]:
    """One set of running statistics standing for both BNs' (equal to both once they agree).

    The weights are α clamped to [0, 1], so the mix is convex and the variance stays ≥ 0 even
    when fine-tuning pushed α outside the unit interval.
    """
    w = alpha.detach().clamp(0, 1)
    return mix(w, mean_pre, mean_new), mix(w, var_pre, var_new)


def folded_parameters(
    block: ABRiBatchNorm, dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(weight, bias, running_mean, running_var)`` of one BN equal to ``block`` in eval mode.

    Eval mode is ``x·s + t`` per channel with ``s = Σ_i a_i γ_i/√(v_i+ε)`` and
    ``t = Σ_i a_i (β_i − μ_i γ_i/√(v_i+ε))`` over the two BNs (weights ``α`` and ``1 − α``).
    The folded statistics are :func:`mixed_statistics`, and γ, β follow from ``s`` and ``t``:
    once the two running statistics agree (they converge during fine-tuning) the folded BN has
    ``γ = γ_eff`` and ``β = β_eff`` and matches the block in training mode too.
    (The block's own eval forward uses :meth:`ABRiBatchNorm.eval_affine`, the same map in
    fewer ops, written against the pretrained BN's statistics.)
    """
    pre, new = block.original, block.additional
    dtype = dtype or pre.weight.dtype
    eps = pre.eps
    a = block.alpha.to(dtype)
    mean_pre, var_pre = pre.running_mean.to(dtype), pre.running_var.to(dtype)
    mean_new, var_new = new.running_mean.to(dtype), new.running_var.to(dtype)
    s_pre = pre.weight.to(dtype) * torch.rsqrt(var_pre + eps)
    s_new = new.weight.to(dtype) * torch.rsqrt(var_new + eps)
    scale = mix(a, s_pre, s_new)
    shift = mix(a, pre.bias.to(dtype) - mean_pre * s_pre, new.bias.to(dtype) - mean_new * s_new)
    mean, var = mixed_statistics(a, mean_pre, var_pre, mean_new, var_new)
    return scale * torch.sqrt(var + eps), shift + mean * scale, mean.detach(), var.detach()


def check_alpha(alpha: float) -> None:
    if not 0.0 <= float(alpha) <= 1.0:
        raise BnfixError(f"alpha must be in [0, 1], got {alpha}")


def check_per(per: str) -> None:
    if per not in PER_CHOICES:
        raise BnfixError(f"alpha per must be one of {', '.join(PER_CHOICES)}, not {per!r}")
