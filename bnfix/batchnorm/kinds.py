"""The BatchNorm kinds ABRi takes: how each one normalises, and what it runs afterwards.

Every kind normalises its input with one batch norm — ``F.batch_norm`` for BatchNorm1d/2d/3d,
the synchronised statistics of the process group for SyncBatchNorm in distributed training —
and may then run more modules: timm's ``BatchNormAct2d`` and ``SyncBatchNormAct`` run ``drop``
and then ``act``. A module's kind is decided by the class that defines its ``forward``:

========================================  ===================  ===========================
forward defined by                        normalisation        after normalising
========================================  ===================  ===========================
``_BatchNorm`` (BatchNorm1d/2d/3d, lazy)  ``F.batch_norm``     nothing
``nn.SyncBatchNorm``                      synchronised         nothing
timm ``BatchNormAct2d``                   ``F.batch_norm``     ``drop``, ``act``
timm ``SyncBatchNormAct``                 synchronised         ``drop``, ``act``
========================================  ===================  ===========================

A subclass that only adds attributes is its base's kind; one that writes its own ``forward`` is
refused (:func:`refusal`), since nothing tells what that forward does with γ and β. Layers
ABRi has nothing to act on are skipped with a reason (:func:`skip_reason`): no affine γ/β, no
running statistics, frozen BatchNorms (torchvision's and timm's ``FrozenBatchNorm2d`` hold
buffers only).

Synchronisation runs torch's own fused SyncBatchNorm kernels on the devices that have them
(CUDA, XPU, HPU, PrivateUse1). torch has no CPU kernels for it, and its SyncBatchNorm refuses
CPU inputs in a distributed run; an ABRi block there (a gloo DDP run on CPUs) synchronises the
batch statistics with two autograd-aware all-reduces instead, so its outputs, gradients and
running statistics are those of the whole global batch as well.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


@dataclass(frozen=True)
class Kind:
    """One way a BatchNorm class runs: synchronised or not, with drop/act after it or not."""

    name: str
    sync: bool  # training statistics are the process group's (SyncBatchNorm)
    act: bool  # ``drop`` then ``act`` run after normalising (timm's *Act layers)

    def after(self, module: nn.Module, y: Tensor) -> Tensor:
        """What the kind runs after normalising (timm: ``drop``, then ``act``)."""
        if self.act:
            drop, act = getattr(module, "drop", None), getattr(module, "act", None)
            if drop is not None:
                y = drop(y)
            if act is not None:
                y = act(y)
        return y


PLAIN = Kind("BatchNorm", sync=False, act=False)
SYNC = Kind("SyncBatchNorm", sync=True, act=False)
ACT = Kind("timm BatchNormAct2d", sync=False, act=True)
SYNC_ACT = Kind("timm SyncBatchNormAct", sync=True, act=True)
KINDS = (PLAIN, SYNC, ACT, SYNC_ACT)

#: timm's layers, by class name; matched on the module path so that timm need not be imported.
_TIMM_KINDS = {"BatchNormAct2d": ACT, "SyncBatchNormAct": SYNC_ACT}


def _forward_owner(cls: type) -> type:
    return next(c for c in cls.__mro__ if "forward" in vars(c))


def _kind_of_class(cls: type) -> Kind | None:
    if not issubclass(cls, _BatchNorm):
        return None
    owner = _forward_owner(cls)
    if owner is _BatchNorm:
        return PLAIN
    if owner is nn.SyncBatchNorm:
        return SYNC
    if owner.__module__.startswith("timm.") and owner.__name__ in _TIMM_KINDS:
        kind = _TIMM_KINDS[owner.__name__]
        if issubclass(cls, nn.SyncBatchNorm) == kind.sync:
            return kind
    return None


_KIND_OF_CLASS: dict[type, Kind | None] = {}


def kind_of(module: nn.Module) -> Kind | None:
    """The kind of a BatchNorm module, or None if ABRi does not know how it runs."""
    cls = type(module)
    if cls not in _KIND_OF_CLASS:  # a plain dict, not functools.cache: torch.compile traces it
        _KIND_OF_CLASS[cls] = _kind_of_class(cls)
    return _KIND_OF_CLASS[cls]


def class_name(module: nn.Module | type) -> str:
    cls = module if isinstance(module, type) else type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def is_frozen_batchnorm(module: nn.Module) -> bool:
    """torchvision's / timm's ``FrozenBatchNorm2d`` (and timm's ``FrozenBatchNormAct2d``)."""
    return type(module).__name__.startswith("FrozenBatchNorm") and hasattr(module, "running_var")


def skip_reason(module: nn.Module) -> str | None:
    """Why ABRi leaves this normalisation layer as it is, or None if it converts it."""
    if is_frozen_batchnorm(module):
        return "frozen BatchNorm: buffers only, nothing to train"
    if not isinstance(module, _BatchNorm):
        return None
    if not module.affine:
        return "no affine γ/β (affine=False): nothing to mix"
    if not module.track_running_stats:
        return "no running statistics (track_running_stats=False)"
    return None


def refusal(name: str, module: nn.Module) -> str | None:
    """Why ABRi cannot take this BatchNorm at all (one line), or None if it can."""
    if not isinstance(module, _BatchNorm) or skip_reason(module) is not None:
        return None
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
        return (
            f"{name} is a {type(module).__name__} whose size is not known yet; run one forward "
            "through the model before converting it"
        )
    if kind_of(module) is None:
        owner = _forward_owner(type(module))
        return (
            f"{name} is a {class_name(module)}, whose forward ({owner.__qualname__}.forward) is "
            "its own: ABRi takes BatchNorm1d/2d/3d, SyncBatchNorm, timm's BatchNormAct2d and "
            "SyncBatchNormAct and subclasses that keep their forward (leave the layer out with "
            "only=..., or replace it first)"
        )
    return None


def twin_class(cls: type[_BatchNorm]) -> type[_BatchNorm]:
    """The plain BatchNorm class a layer of class ``cls`` gets as its fresh twin."""
    for base in (nn.SyncBatchNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
        if issubclass(cls, base):
            return base
    return nn.BatchNorm2d  # another _BatchNorm subclass: the twin's forward never runs


# --- normalisation ------------------------------------------------------------------------------

_STOCK_SYNC_DEVICES = ("cuda", "hpu", "xpu")


def _sync_world(bn: nn.Module) -> tuple[object, int]:
    """The process group a SyncBatchNorm synchronises over and its size (1: nothing to sync)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None, 1
    group = getattr(bn, "process_group", None) or dist.group.WORLD
    return group, dist.get_world_size(group)


def normalise(
    bn: _BatchNorm,
    kind: Kind,
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor,
    bias: Tensor,
    batch_statistics: bool,
    factor: float,
    synchronise: bool,
) -> Tensor:
    """One batch norm of ``x`` with ``weight``/``bias``, as ``bn``'s kind normalises.

    Arguments as ``F.batch_norm``'s (``factor``: the running-statistics update factor);
    ``synchronise``: use the process group's batch statistics (training mode of a sync kind).
    """
    if synchronise and kind.sync and batch_statistics:
        group, world = _sync_world(bn)
        if world > 1:
            if x.device.type in _STOCK_SYNC_DEVICES or (
                x.device.type == torch._C._get_privateuse1_backend_name()
            ):
                from torch.nn.modules._functions import SyncBatchNorm as _SyncBatchNorm

                return _SyncBatchNorm.apply(
                    x, weight, bias, running_mean, running_var, bn.eps, factor, group, world
                )
            return _all_reduce_batch_norm(
                x, weight, bias, running_mean, running_var, bn.eps, factor, group
            )
    return F.batch_norm(
        x, running_mean, running_var, weight, bias, batch_statistics, factor, bn.eps
    )


def _all_reduce_batch_norm(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    eps: float,
    factor: float,
    group: object,
) -> Tensor:
    """Batch norm over the whole process group's batch, for devices without torch's kernels.

    Two autograd-aware all-reduces (sum and count, then the sum of squared deviations from
    the global mean): the backward all-reduces the gradients in turn, so input and parameter
    gradients are those of the global batch, as with torch's SyncBatchNorm.
    """
    from torch.distributed.nn.functional import all_reduce

    c = x.shape[1]
    dims = [0, *range(2, x.dim())]
    shape = [1, c] + [1] * (x.dim() - 2)
    compute = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(compute)
    count = xf.new_full((1,), float(x.numel() // c))
    sums = all_reduce(torch.cat([xf.sum(dims), count]), group=group)
    total = sums[c:].detach()
    mean = sums[:c] / total
    centred = xf - mean.view(shape)
    var = all_reduce(centred.square().sum(dims), group=group) / total
    if float(total) <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {x.size()}"
        )
    scale = torch.rsqrt(var + eps) * weight.to(compute)
    y = torch.addcmul(bias.to(compute).view(shape), centred, scale.view(shape))
    with torch.no_grad():
        if running_mean is not None:
            running_mean.lerp_(mean.detach().to(running_mean.dtype), factor)
        if running_var is not None:
            unbiased = var.detach() * (total / (total - 1))
            running_var.lerp_(unbiased.to(running_var.dtype), factor)
    return y.to(x.dtype)
