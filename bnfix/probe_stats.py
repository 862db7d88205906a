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

from bnfix.batchnorm.abri import ABRiBatchNorm
from bnfix.batchnorm.kinds import Kind, kind_of

#: Largest temporary (in elements) a hook may allocate at once; bounds the probe's extra memory.
_CHUNK_ELEMENTS = 1 << 20


def _recorded_kind(module: nn.Module) -> Kind | None:
    """The BN kind of a layer the probe measures from its own normalisation (every kind
    :mod:`bnfix.batchnorm.kinds` knows, ABRi blocks of any kind), or None: a BN subclass with
    a forward of its own, measured by its input and output around that forward instead."""
    return kind_of(module.original if isinstance(module, ABRiBatchNorm) else module)


@dataclass
class ChannelStats:
    """What one BN layer saw over the whole probe (CPU float64 tensors of length C)."""

    active_fraction: torch.Tensor  # share of output elements > 0
    dead_sample_fraction: torch.Tensor  # share of samples where the whole channel is ≤ 0
    input_mean: torch.Tensor
    input_var: torch.Tensor
    samples: int
    non_finite: bool = False  # the layer's input held NaN/Inf: its outputs say nothing


class _Accumulator:
    """O(C) running sums for one layer, fed once per batch by the layer's forward."""

    def __init__(self) -> None:
        self.samples = 0
        self.elements = 0
        self.positive: torch.Tensor | None = None
        self.dead: torch.Tensor | None = None
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def add_input(self, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
        """Fold one batch's per-channel mean and (biased) variance over ``count`` elements.

        Chan et al.'s parallel update: the pooled mean and variance are exact across batches.
        """
        mean, m2 = mean.double(), var.double().clamp(min=0) * count
        if self.mean is None or self.m2 is None:
            self.mean, self.m2 = mean, m2
        else:
            total = self.elements + count
            delta = mean - self.mean
            self.mean = self.mean + delta * (count / total)
            self.m2 = self.m2 + m2 + delta.square() * (self.elements * count / total)
        self.elements += count

    def add_output(self, y: torch.Tensor) -> None:
        """Count positive elements per (sample, channel); a sample with none is a dead one."""
        n, c = y.shape[0], y.shape[1]
        positive = torch.zeros(c, dtype=torch.float64, device=y.device)
        dead = torch.zeros(c, dtype=torch.float64, device=y.device)
        step = max(1, _CHUNK_ELEMENTS // max(1, y[0].numel()))
        for start in range(0, n, step):  # chunks bound the boolean temporaries
            rows = y[start : start + step].reshape(-1, c, y[0, 0].numel())
            # an int8 view of the bool mask sums several times faster than the bool itself
            counts = (rows > 0).view(torch.int8).sum(dim=2, dtype=torch.int32)
            positive += counts.sum(dim=0, dtype=torch.float64)
            dead += (counts == 0).sum(dim=0, dtype=torch.float64)
        self.positive = positive if self.positive is None else self.positive + positive
        self.dead = dead if self.dead is None else self.dead + dead
        self.samples += n

    def hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        """For a BN subclass with its own forward: its input, and its output as it returns it."""
        x = args[0].detach()
        var, mean = torch.var_mean(x, dim=[0, *range(2, x.dim())], correction=0)
        self.add_input(mean, var, x.numel() // x.shape[1])
        self.add_output(output.detach())

    def result(self) -> ChannelStats:
        assert self.positive is not None and self.dead is not None
        assert self.mean is not None and self.m2 is not None
        return ChannelStats(
            active_fraction=(self.positive / (self.elements or 1)).cpu(),
            dead_sample_fraction=(self.dead / self.samples).cpu(),
            input_mean=self.mean.cpu(),
            input_var=(self.m2 / self.elements).cpu(),
            samples=self.samples,
            # NaN/Inf anywhere in the input makes its batch mean or variance non-finite, so the
            # pooled moments tell without another pass over the activations.
            non_finite=not bool(torch.isfinite(self.mean).all() and torch.isfinite(self.m2).all()),
        )


def _recording_forward(bn: _BatchNorm | ABRiBatchNorm, kind: Kind, acc: _Accumulator):
    """The layer's normalisation in batch-statistics mode, handing its batch statistics and its
    normalised output over, then what its kind runs after normalising (timm's drop and act).

    The output measured is the normalised one, before any activation the layer carries, as for
    a plain BN followed by its own ReLU. An ABRi block in training mode is one batch norm with
    its effective γ and β, so it is measured the same way, as one layer. Nothing is
    synchronised (a SyncBatchNorm does not synchronise outside training either).
    """
    norm = bn.original if isinstance(bn, ABRiBatchNorm) else bn

    def forward(x: torch.Tensor) -> torch.Tensor:
        norm._check_input_dim(x)
        if isinstance(bn, ABRiBatchNorm):
            weight, bias = bn.effective_affine()
        else:
            weight, bias = bn.weight, bn.bias
        out, mean, invstd = torch.native_batch_norm(
            x, weight, bias, None, None, True, 0.0, norm.eps
        )
        acc.add_input(mean, invstd.pow(-2) - norm.eps, x.numel() // x.shape[1])
        acc.add_output(out)
        return kind.after(norm, out)

    return forward


def bn_eps(module: nn.Module) -> float:
    return module.original.eps if isinstance(module, ABRiBatchNorm) else module.eps


def bn_modules(model: nn.Module) -> dict[str, _BatchNorm | ABRiBatchNorm]:
    """The normalisation layers a scan reports, in module order: BNs of every kind, and ABRi
    blocks (of every kind) as one."""
    layers: dict[str, _BatchNorm | ABRiBatchNorm] = {}
    inside: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, ABRiBatchNorm):
            layers[name] = module
            inside.update(f"{name}.{child}" for child in ("original", "additional"))
        elif isinstance(module, _BatchNorm) and name not in inside:
            layers[name] = module
    return layers


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
        for name, bn in model.named_modules():
            if not isinstance(bn, _BatchNorm):
                continue
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
    modules = bn_modules(model)
    accumulators = {name: _Accumulator() for name in modules}
    handles = []
    try:
        for name, bn in modules.items():
            kind = _recorded_kind(bn)
            if kind is not None:
                bn.forward = _recording_forward(bn, kind, accumulators[name])
            else:
                handles.append(bn.register_forward_hook(accumulators[name].hook))
        with batch_statistics_mode(model), torch.inference_mode():
            for batch in batches:
                model(batch.to(device, non_blocking=True))
    finally:
        for handle in handles:
            handle.remove()
        for bn in modules.values():
            bn.__dict__.pop("forward", None)
    return {name: acc.result() for name, acc in accumulators.items() if acc.samples}


def _valid_statistics(running_mean: torch.Tensor, running_var: torch.Tensor) -> torch.Tensor:
    """Channels whose stored statistics can be compared with anything (finite, variance ≥ 0):
    one broken channel must not turn a layer's domain gap into NaN."""
    return torch.isfinite(running_mean) & torch.isfinite(running_var) & (running_var >= 0)


def _mean(values: torch.Tensor) -> float:
    value = float(values.mean()) if values.numel() else float("nan")
    return value if math.isfinite(value) else float("nan")


def mean_shift(
    stats: ChannelStats, running_mean: torch.Tensor, running_var: torch.Tensor, eps: float
) -> float:
    """Mean over valid channels of |probe mean − stored mean| in units of the stored std."""
    valid = _valid_statistics(running_mean, running_var)
    shift = (stats.input_mean - running_mean).abs() / (running_var.clamp(min=0) + eps).sqrt()
    return _mean(shift[valid])


def log_var_ratio(stats: ChannelStats, running_var: torch.Tensor, eps: float) -> float:
    """Mean over valid channels of log(probe variance / stored variance); 0: no domain gap."""
    valid = _valid_statistics(torch.zeros_like(running_var), running_var)
    ratio = torch.log((stats.input_var + eps) / (running_var.clamp(min=0) + eps))
    return _mean(ratio[valid])
