"""Adaptive BatchNorm Re-initialisation (ABRi) as a drop-in module, plus ``convert`` and ``fold``.

The paper's block mixes the pretrained BN with a fresh twin, ``y = α·BN_pre(x) + (1−α)·BN_new(x)``.
Both BNs see the same batch statistics in training, so the mix *is* one batch norm with
``γ_eff = αγ_pre + (1−α)γ_new`` and ``β_eff = αβ_pre + (1−α)β_new``; autograd through ``γ_eff`` and
``β_eff`` gives exactly the two-BN gradients. The fresh BN's running statistics follow from the
pretrained one's update by an O(C) identity instead of a second pass over the activations. In
eval mode the block is a per-channel affine map, written as the γ and β of one BatchNorm that
normalises with the pretrained BN's running statistics, so that the forward is the same single
kernel a plain BN runs (and :func:`fold` is that map).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnfix.errors import BnfixError

Per = Literal["layer", "channel"]
PER_CHOICES: tuple[str, ...] = ("layer", "channel")


class ABRiBatchNorm2d(nn.Module):
    """``α ⊙ original(x) + (1 − α) ⊙ additional(x)`` in one normalisation pass.

    State-dict keys: ``original.*`` (the pretrained BN, unchanged), ``additional.*`` (fresh:
    γ=1, β=0, running mean 0, var 1, same eps and momentum) and ``alpha`` (shape ``[1]`` per
    layer or ``[C]`` per channel). The two BNs stay real ``nn.BatchNorm2d`` modules so their
    tensors keep the names every tool expects.
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
    ) -> None:
        super().__init__()
        if per not in PER_CHOICES:
            raise BnfixError(f"alpha per must be one of {', '.join(PER_CHOICES)}, not {per!r}")
        check_alpha(alpha)
        kw = {"device": device, "dtype": dtype}
        self.original = nn.BatchNorm2d(num_features, eps=eps, momentum=momentum, **kw)
        self.additional = nn.BatchNorm2d(num_features, eps=eps, momentum=momentum, **kw)
        size = 1 if per == "layer" else num_features
        self.alpha = nn.Parameter(torch.full((size,), float(alpha), device=device, dtype=dtype))

    @classmethod
    def from_batchnorm(
        cls, bn: nn.BatchNorm2d, alpha: float = 0.5, per: Per = "layer"
    ) -> ABRiBatchNorm2d:
        """Wrap ``bn`` (its tensors are moved in, not copied) next to a fresh twin."""
        if not bn.affine or not bn.track_running_stats:
            raise BnfixError(
                "ABRi needs an affine BatchNorm2d that tracks running statistics "
                f"(affine={bn.affine}, track_running_stats={bn.track_running_stats})"
            )
        ref = bn.weight
        block = cls(bn.num_features, bn.eps, bn.momentum, alpha, per, ref.device, ref.dtype)
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
        if x.dim() != 4:
            raise ValueError(f"expected a 4-D input [N, C, H, W], got {x.dim()}-D")
        if not self.training:
            pre = self.original
            weight, bias = self.eval_affine()
            return F.batch_norm(
                x, pre.running_mean, pre.running_var, weight, bias, False, 0.0, pre.eps
            )
        return self._train_forward(x)

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

    def _train_forward(self, x: Tensor) -> Tensor:
        """One normalisation pass; the block's state changes only once it has succeeded.

        A forward that raises (a batch of one, a dtype or device mismatch, out of memory in an
        OOM-retry loop) leaves both BNs' running statistics and batch counts as they were, so
        a retry is the same step as if the failed call had never happened.
        """
        pre, new = self.original, self.additional
        check_batch_size(x)  # F.batch_norm's check, which torch.native_batch_norm lacks
        weight, bias = self.effective_affine()
        f_pre, f_new = update_factor(pre), update_factor(new)
        stats_pre = [pre.running_mean, pre.running_var]
        stats_new = [new.running_mean, new.running_var]
        if f_pre == f_new:
            # Same update factor m for both: r_new' = r_pre' + (1 − m)(r_new − r_pre).
            with torch.no_grad():  # into a temporary: the twin waits until the kernel ran
                gap = torch._foreach_sub(stats_new, stats_pre)  # r_new − r_pre, before the update
                torch._foreach_mul_(gap, 1.0 - f_pre)
            y = F.batch_norm(
                x, pre.running_mean, pre.running_var, weight, bias, True, f_pre, pre.eps
            )
            with torch.no_grad():
                torch._foreach_copy_(stats_new, stats_pre)
                torch._foreach_add_(stats_new, gap)
        else:
            # Cumulative averaging with different batch counts: the identity needs one factor,
            # so take the batch statistics the kernel computed anyway and update the twin.
            y, mean, invstd = torch.native_batch_norm(
                x, weight, bias, pre.running_mean, pre.running_var, True, f_pre, pre.eps
            )
            with torch.no_grad():
                n = x.numel() // x.shape[1]  # > 1: check_batch_size
                var = (invstd.double().pow(-2) - pre.eps).clamp_(min=0) * (n / (n - 1))
                new.running_mean.lerp_(mean.to(new.running_mean.dtype), f_new)
                new.running_var.lerp_(var.to(new.running_var.dtype), f_new)
        with torch.no_grad():
            torch._foreach_add_([pre.num_batches_tracked, new.num_batches_tracked], 1)
        return y


def check_batch_size(x: Tensor) -> None:
    """Refuse, as ``F.batch_norm`` does in training, an input with one value per channel."""
    if math.prod((x.shape[0], *x.shape[2:])) == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {x.size()}"
        )


def update_factor(bn: nn.BatchNorm2d) -> float:
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
    block: ABRiBatchNorm2d, dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(weight, bias, running_mean, running_var)`` of one BN equal to ``block`` in eval mode.

    Eval mode is ``x·s + t`` per channel with ``s = Σ_i a_i γ_i/√(v_i+ε)`` and
    ``t = Σ_i a_i (β_i − μ_i γ_i/√(v_i+ε))`` over the two BNs (weights ``α`` and ``1 − α``).
    The folded statistics are :func:`mixed_statistics`, and γ, β follow from ``s`` and ``t``:
    once the two running statistics agree (they converge during fine-tuning) the folded BN has
    ``γ = γ_eff`` and ``β = β_eff`` and matches the block in training mode too.
    (The block's own eval forward uses :meth:`ABRiBatchNorm2d.eval_affine`, the same map in
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


def convert(
    model: nn.Module, alpha: float = 0.5, per: Per = "layer", only: Iterable[str] | None = None
) -> nn.Module:
    """Swap ``nn.BatchNorm2d`` modules for ABRi blocks in place (by module name); return ``model``.

    ``only`` restricts the swap to the named modules. Other batch norms that act on feature
    maps (SyncBatchNorm, timm's BatchNormAct2d and other subclasses) are refused: swapping them
    would silently drop what they add. BatchNorm1d/3d are left alone.

    Existing ABRi blocks are left exactly as they are (their inner ``original``/``additional``
    BNs belong to the block), so converting twice is a no-op for them whatever ``alpha`` and
    ``per`` say; naming a block in ``only`` is allowed, naming a BN inside one is refused.
    """
    check_alpha(alpha)
    if per not in PER_CHOICES:
        raise BnfixError(f"alpha per must be one of {', '.join(PER_CHOICES)}, not {per!r}")
    wanted = None if only is None else set(only)
    found: set[str] = set()
    for name, module in list(_layers(model)):
        if isinstance(module, ABRiBatchNorm2d):
            found.add(name)  # already converted
            continue
        if not isinstance(module, _BatchNorm) or (wanted is not None and name not in wanted):
            continue
        if type(module) in (nn.BatchNorm1d, nn.BatchNorm3d):
            continue  # not a 2-D feature map: ABRi is defined for conv BNs only
        if type(module) is not nn.BatchNorm2d:
            kind = f"{type(module).__module__}.{type(module).__qualname__}"
            raise BnfixError(
                f"{name} is a {kind}, not a plain BatchNorm2d; ABRi converts plain "
                "nn.BatchNorm2d only (replace it first, or leave the layer out with only=...)"
            )
        found.add(name)
        _set_submodule(model, name, ABRiBatchNorm2d.from_batchnorm(module, alpha, per))
    if wanted is not None and (missing := sorted(wanted - found)):
        inner = [n for n in missing if any(n.startswith(f"{b}.") for b in found)]
        if inner:
            raise BnfixError(
                f"{', '.join(inner)} is inside an ABRi block; name the block itself in only=..."
            )
        raise BnfixError(f"no BatchNorm2d named {', '.join(missing)} in the model")
    return model


def _layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``model.named_modules()`` without descending into ABRi blocks (each shared module once)."""
    seen: set[int] = set()
    stack = [("", model)]
    while stack:
        name, module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        yield name, module
        if not isinstance(module, ABRiBatchNorm2d):
            children = [(f"{name}.{k}" if name else k, m) for k, m in module.named_children()]
            stack.extend(reversed(children))


def fold(model: nn.Module) -> nn.Module:
    """Replace every ABRi block by the one ``nn.BatchNorm2d`` it equals in eval mode, in place.

    Folding is computed in float64 and stored in the block's dtype; each new module keeps the
    block's train/eval mode, device and dtype, and the pretrained BN's eps, momentum and batch
    count.
    """
    if isinstance(model, ABRiBatchNorm2d):
        return fold_block(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, ABRiBatchNorm2d):
            _set_submodule(model, name, fold_block(module))
    return model


def fold_block(block: ABRiBatchNorm2d) -> nn.BatchNorm2d:
    pre = block.original
    bn = nn.BatchNorm2d(
        pre.num_features, pre.eps, pre.momentum, device=pre.weight.device, dtype=pre.weight.dtype
    )
    with torch.no_grad():
        weight, bias, mean, var = folded_parameters(block, torch.float64)
        for target, value in zip(
            (bn.weight, bn.bias, bn.running_mean, bn.running_var),
            (weight, bias, mean, var),
            strict=True,
        ):
            target.copy_(value)
        bn.num_batches_tracked.copy_(pre.num_batches_tracked)
    bn.train(block.training)
    return bn


def abri_blocks(model: nn.Module) -> dict[str, ABRiBatchNorm2d]:
    return {n: m for n, m in model.named_modules() if isinstance(m, ABRiBatchNorm2d)}


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    if not name:
        raise BnfixError("convert/fold act on the modules inside a model, not on a bare BatchNorm")
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)
