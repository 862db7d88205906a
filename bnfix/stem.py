"""Modality adaptation of a model's stem: the first convolution takes the modality's channels.

An RGB stem on spectrograms sums its weights over the three inputs (a spectrogram repeated to
three channels gives the same output); a one-channel stem on images repeats its weights ÷3
(the same output as on the channel mean). Nothing else has such an equivalence.
"""

from __future__ import annotations

import torch
from torch import nn

from bnfix.errors import BnfixError

MODALITY_CHANNELS = {"audio": 1, "visual": 3}


def stem_conv(model: nn.Module) -> tuple[str, nn.Conv2d]:
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            return name, module
    raise BnfixError("the model has no Conv2d, so there is no stem to adapt")


def adapt_weight(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    have = weight.shape[1]
    if have == in_channels:
        return weight
    if have == 3 and in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    if have == 1 and in_channels == 3:
        return weight.repeat(1, 3, 1, 1) / 3
    raise BnfixError(
        f"the stem takes {have} input channels and the modality has {in_channels}; only 1 <-> 3 "
        "can be adapted"
    )


def adapt_stem(model: nn.Module, in_channels: int) -> str | None:
    """Give the stem ``in_channels`` inputs in place; a note saying what changed, or None."""
    name, conv = stem_conv(model)
    have = conv.in_channels
    if have == in_channels:
        return None
    if conv.groups != 1:
        raise BnfixError(f"stem {name} is a grouped convolution; cannot adapt its input channels")
    with torch.no_grad():
        weight = adapt_weight(conv.weight.detach(), in_channels).clone()
    conv.weight = nn.Parameter(weight, requires_grad=conv.weight.requires_grad)
    conv.in_channels = in_channels
    how = "summed over RGB" if in_channels == 1 else "repeated ÷3"
    return f"{name}: {have} -> {in_channels} input channels ({how})"
