"""Re-estimate BatchNorm running statistics on target-modality data (AdaBN).

The idea of ``torch.optim.swa_utils.update_bn``: reset the statistics, switch to a cumulative
average (``momentum=None``) and run the data through. Two differences: only the BNs are put in
training mode (dropout stays off, so the statistics are those the model will see in eval), and
a ``forward`` callable lets models that take several inputs be fed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnfix.batchnorm.abri import ABRiBatchNorm


def recalibrate(
    model: nn.Module,
    batches: Iterable[object],
    device: torch.device | str = "cpu",
    forward: Callable[[nn.Module, object], object] | None = None,
) -> int:
    """Replace every BN's running statistics by their average over ``batches``; return the count.

    Every BatchNorm kind is covered, each as one layer: an ABRi block's two BNs are reset and
    see the same batches, so after recalibration the pretrained BN and its twin hold the same
    statistics (and fold exactly in both modes). Only the normalisation switches to training
    mode, not the modules a BN kind carries (timm's ``drop`` stays off).
    """
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    was_training = model.training
    modes = {m: m.training for m in model.modules()}
    momenta = {bn: bn.momentum for bn in bns}
    call = forward or _call
    count = 0
    try:
        model.eval()
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None
            bn.training = True  # not bn.train(): timm's drop/act children stay in eval mode
        for block in model.modules():
            if isinstance(block, ABRiBatchNorm):
                block.training = True  # the block, not only its BNs, decides which path runs
        with torch.no_grad():
            for batch in batches:
                call(model, _to(batch, device))
                count += 1
    finally:
        for bn, momentum in momenta.items():
            bn.momentum = momentum
        for module, mode in modes.items():
            module.training = mode
        model.training = was_training
    return count


def _call(model: nn.Module, batch: object) -> object:
    return model(batch)


def _to(batch: object, device: torch.device | str) -> object:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch
