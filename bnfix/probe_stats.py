"""Streaming per-channel statistics of BatchNorm layers while a probe runs through a model.

Nothing per activation is kept: each forward hook folds its batch into O(C) running sums
(positive counts, per-sample "whole channel ≤ 0" counts, Chan-merged input mean/variance) and
drops the activation. The BNs run in batch-statistics mode, as fine-tuning sees them, and
their stored running statistics are left exactly as they were.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

#: Largest temporary (in elements) a hook may allocate at once; bounds the probe's extra memory.
_CHUNK_ELEMENTS = 1 << 20


@dataclass
class ChannelStats:
    """What one BN layer saw over the whole probe (CPU float64 tensors of length C)."""

    active_fraction: torch.Tensor  # share of output elements > 0
    dead_sample_fraction: torch.Tensor  # share of samples where the whole channel is ≤ 0
    input_mean: torch.Tensor
    input_var: torch.Tensor
    samples: int


class _Accumulator:
    """O(C) running sums for one layer, updated by a forward hook on every batch."""

    def __init__(self) -> None:
        self.samples = 0
        self.elements = 0
        self.positive: torch.Tensor | None = None
        self.dead: torch.Tensor | None = None
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        x = args[0].detach()
        y = output.detach()
        n, c = y.shape[0], y.shape[1]
        positive = torch.zeros(c, dtype=torch.float64, device=y.device)
        dead = torch.zeros(c, dtype=torch.float64, device=y.device)
        per_sample = max(1, y[0].numel())
        step = max(1, _CHUNK_ELEMENTS // per_sample)
        for start in range(0, n, step):  # chunks bound the boolean temporaries
            part = y[start : start + step]
            flat = part.reshape(part.shape[0], c, -1)
            positive += (flat > 0).sum(dim=(0, 2), dtype=torch.float64)
            dead += (flat.amax(dim=2) <= 0).sum(dim=0, dtype=torch.float64)
        dims = [0, *range(2, x.dim())]
        var, mean = torch.var_mean(x, dim=dims, correction=0)
        count = x.numel() // c
        self._merge(mean.double(), var.double() * count, count)
        self.positive = positive if self.positive is None else self.positive + positive
        self.dead = dead if self.dead is None else self.dead + dead
        self.samples += n
        self.elements += count

    def _merge(self, mean: torch.Tensor, m2: torch.Tensor, count: int) -> None:
        """Chan et al.'s parallel update: exact pooled mean and variance across batches."""
        if self.mean is None:
            self.mean, self.m2 = mean, m2
            return
        total = self.elements + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.elements * count / total)

    def result(self) -> ChannelStats:
        assert self.positive is not None and self.mean is not None
        return ChannelStats(
            active_fraction=(self.positive / self.elements).cpu(),
            dead_sample_fraction=(self.dead / self.samples).cpu(),
            input_mean=self.mean.cpu(),
            input_var=(self.m2 / self.elements).cpu(),
            samples=self.samples,
        )


def bn_modules(model: nn.Module) -> dict[str, _BatchNorm]:
    return {name: m for name, m in model.named_modules() if isinstance(m, _BatchNorm)}


@contextlib.contextmanager
def batch_statistics_mode(model: nn.Module) -> Iterator[None]:
    """Run ``model`` in eval mode but with every BN normalising by the batch's own statistics.

    Hiding the running buffers makes ``_BatchNorm.forward`` use batch statistics without
    updating anything; dropout and the like stay in eval mode. Everything is restored after.
    """
    was_training = model.training
    saved = {}
    model.eval()
    try:
        for name, bn in bn_modules(model).items():
            saved[name] = (bn, bn.running_mean, bn.running_var)
            bn.running_mean = None
            bn.running_var = None
        yield
    finally:
        for bn, mean, var in saved.values():
            bn.running_mean, bn.running_var = mean, var
        model.train(was_training)


def collect(
    model: nn.Module, batches: Iterable[torch.Tensor], device: torch.device | str = "cpu"
) -> dict[str, ChannelStats]:
    """Run every batch through ``model`` and return each BN layer's statistics by module name."""
    accumulators = {name: _Accumulator() for name in bn_modules(model)}
    handles = [m.register_forward_hook(accumulators[n]) for n, m in bn_modules(model).items()]
    try:
        with batch_statistics_mode(model), torch.inference_mode():
            for batch in batches:
                model(batch.to(device, non_blocking=True))
    finally:
        for handle in handles:
            handle.remove()
    return {name: acc.result() for name, acc in accumulators.items() if acc.samples}


def mean_shift(
    stats: ChannelStats, running_mean: torch.Tensor, running_var: torch.Tensor, eps: float
) -> float:
    """Mean over channels of |probe mean − stored mean| in units of the stored std."""
    shift = (stats.input_mean - running_mean).abs() / (running_var + eps).sqrt()
    return float(shift.mean())


def log_var_ratio(stats: ChannelStats, running_var: torch.Tensor, eps: float) -> float:
    """Mean over channels of log(probe variance / stored variance); 0 means no domain gap."""
    ratio = torch.log((stats.input_var + eps) / (running_var + eps))
    value = float(ratio.mean())
    return value if math.isfinite(value) else float("nan")
