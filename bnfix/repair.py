"""Repair strategies, applied to a model in place: ABRi, or resetting BN parameters.

``abri`` keeps every pretrained BN and adds a fresh twin (see :mod:`bnfix.abri`);
``reset-dead`` sets γ=1, β=0 on the channels the static scan flags (abnormal pairs and
always-dead channels), as the paper's baseline does; ``reset-all`` returns every BN to its
defaults (γ=1, β=0, mean 0, var 1), i.e. throws the pretrained normalisation away; ``keep``
changes no BN: with ``--recalibrate`` it is plain AdaBN (new statistics, the learned γ and β
kept), what a scan recommends for a domain gap with healthy channels.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnfix.abri import Per, abri_blocks, convert_report
from bnfix.errors import BnfixError
from bnfix.masks import (
    Thresholds,
    abnormal_mask,
    always_dead_mask,
    indices,
    invalid_mask,
    zero_layer,
)

STRATEGIES = ("abri", "reset-dead", "reset-all", "keep")


@dataclass
class RepairOutcome:
    """What a strategy changed: layers, channels, and per layer which channels (reset-dead);
    for ``abri``, the layers left alone and why (``skipped``: frozen or non-affine BNs...)."""

    strategy: str
    layers: int
    channels: int
    reset: dict[str, list[int]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def flagged_channels(bn: _BatchNorm, t: Thresholds) -> list[int]:
    """Abnormal, always-dead or invalid (NaN/Inf, negative variance) channels of one BN, by
    the scan's own rules."""
    flagged, invalid = _masks(bn, t)
    return indices(flagged | invalid)


def _masks(bn: _BatchNorm, t: Thresholds) -> tuple[torch.Tensor, torch.Tensor]:
    """(abnormal or always dead, invalid) channel masks of one BN."""
    weight, bias = bn.weight.detach().double().cpu(), bn.bias.detach().double().cpu()
    flagged = abnormal_mask(weight, bias, t) | always_dead_mask(weight, bias, t)
    if zero_layer(weight, bias):  # as the scan reports it: no channel flagged
        flagged = torch.zeros_like(flagged)
    if bn.running_mean is None or bn.running_var is None:
        return flagged, ~(torch.isfinite(weight) & torch.isfinite(bias))
    mean, var = bn.running_mean.double().cpu(), bn.running_var.double().cpu()
    return flagged, invalid_mask(weight, bias, mean, var)


def reset_dead(model: nn.Module, t: Thresholds = Thresholds()) -> RepairOutcome:
    """γ=1, β=0 on flagged channels; invalid ones also get running mean 0 and variance 1
    (a NaN statistic would otherwise keep the channel's output NaN)."""
    reset: dict[str, list[int]] = {}
    for name, bn in _affine_bns(model).items():
        flagged, invalid_channels = _masks(bn, t)
        channels = indices(flagged | invalid_channels)
        if channels:
            invalid = indices(invalid_channels)
            with torch.no_grad():
                bn.weight[channels] = 1.0
                bn.bias[channels] = 0.0
                if invalid and bn.running_mean is not None and bn.running_var is not None:
                    bn.running_mean[invalid] = 0.0
                    bn.running_var[invalid] = 1.0
            reset[name] = channels
    return RepairOutcome("reset-dead", len(reset), sum(map(len, reset.values())), reset)


def reset_all(model: nn.Module) -> RepairOutcome:
    bns = _affine_bns(model)
    for bn in bns.values():
        bn.reset_parameters()
    return RepairOutcome("reset-all", len(bns), sum(bn.num_features for bn in bns.values()))


def apply_abri(model: nn.Module, alpha: float = 0.5, per: Per = "layer") -> RepairOutcome:
    """Every BatchNorm kind an ABRi block; layers ABRi leaves alone are in ``skipped`` (and a
    warning), a kind it cannot take is a :class:`BnfixError` before anything changes."""
    report = convert_report(model, alpha=alpha, per=per)
    if report.skipped:
        warnings.warn(report.summary(), UserWarning, stacklevel=2)
    blocks = abri_blocks(model)
    channels = sum(b.num_features for b in blocks.values())
    return RepairOutcome("abri", len(blocks), channels, skipped=dict(report.skipped))


def apply_strategy(
    model: nn.Module,
    strategy: str,
    alpha: float = 0.5,
    per: Per = "layer",
    t: Thresholds = Thresholds(),
) -> RepairOutcome:
    if strategy == "abri":
        return apply_abri(model, alpha, per)
    if strategy == "reset-dead":
        return reset_dead(model, t)
    if strategy == "reset-all":
        return reset_all(model)
    if strategy == "keep":
        return RepairOutcome("keep", 0, 0)
    raise BnfixError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")


def _affine_bns(model: nn.Module) -> dict[str, _BatchNorm]:
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, _BatchNorm) and m.affine and m.track_running_stats
    }
