"""The stem, and its modality adaptation: the first convolution takes the modality's channels.

The stem is the first convolution in module order, of any dimension: ``nn.Conv1d`` (a waveform
model), ``nn.Conv2d`` (images, spectrograms), ``nn.Conv3d`` (video clips); subclasses such as
timm's ``Conv2dSame`` count. An RGB stem on spectrograms sums its weights over the three inputs
(a spectrogram repeated to three channels gives the same output); a one-channel stem on images
repeats its weights ÷3 (the same output as on the channel mean). Both hold for every kernel
dimension. Nothing else has such an equivalence.
"""

from __future__ import annotations

import torch
from torch import nn

from bnfix.errors import BnfixError
from bnfix.models.layouts import CONVOLUTIONS

__all__ = [
    "MODALITY_CHANNELS",
    "adapt_stem",
    "adapt_weight",
    "stem_conv",
    "stem_dimensions",
    "stem_in_channels",
]

MODALITY_CHANNELS = {"audio": 1, "visual": 3}

Convolution = nn.Conv1d | nn.Conv2d | nn.Conv3d


def stem_conv(model: nn.Module) -> tuple[str, Convolution]:
    """The first (non-transposed) convolution in module order, and its module path."""
    for name, module in model.named_modules():
        if isinstance(module, CONVOLUTIONS) and not module.transposed:
            return name, module
    raise BnfixError("the model has no convolution (Conv1d/2d/3d), so there is no stem to adapt")


def stem_in_channels(model: nn.Module) -> int:
    """Input channels of the stem: what a probe batch must have."""
    try:
        return stem_conv(model)[1].in_channels
    except BnfixError:
        raise BnfixError(
            "the model has no convolution (Conv1d/2d/3d), so its input channels are unknown"
        ) from None


def stem_dimensions(model: nn.Module) -> int:
    """How many spatial/temporal dimensions the stem convolves: 1, 2 or 3 (a probe batch has
    this many dimensions after batch and channels)."""
    return len(stem_conv(model)[1].kernel_size)


def adapt_weight(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """A stem weight ``[out, in, *kernel]`` for ``in_channels`` inputs (1 <-> 3 only)."""
    have = weight.shape[1]
    if have == in_channels:
        return weight
    if have == 3 and in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    if have == 1 and in_channels == 3:
        return weight.repeat(1, 3, *([1] * (weight.dim() - 2))) / 3
    raise BnfixError(
        f"the stem takes {have} input channels and the modality has {in_channels}; only 1 <-> 3 "
        "can be adapted"
    )


#: Input sizes for the meta-device pass that finds the convolutions reading the input (no
#: arithmetic happens on meta tensors, so generous sizes cost nothing).
_META_SIZES = {1: (16000,), 2: (224, 224), 3: (16, 112, 112)}


def input_convolutions(model: nn.Module) -> list[str]:
    """Module paths of every convolution that reads the model's input itself, found by one
    forward pass on the meta device (the model's own tensors are not touched): the stem, and
    in a multi-branch stem (timm's RepVGG, MobileOne) its parallel branches. Just the stem
    when the pass cannot run (data-dependent control flow, an input it does not accept)."""
    from torch.func import functional_call

    stem_name, stem = stem_conv(model)
    size = _META_SIZES.get(len(stem.kernel_size))
    if size is None:
        return [stem_name]
    x = torch.empty(1, stem.in_channels, *size, device="meta")
    found: list[str] = []
    hooks = [
        module.register_forward_pre_hook(
            lambda _m, args, name=name: found.append(name) if args and args[0] is x else None
        )
        for name, module in model.named_modules()
        if isinstance(module, CONVOLUTIONS) and not module.transposed
    ]
    tensors = {
        k: torch.empty_like(v, device="meta")
        for k, v in (*model.named_parameters(), *model.named_buffers())
    }
    try:
        with torch.no_grad():
            functional_call(model, tensors, (x,), strict=False)
    except Exception:  # anything the model does that meta tensors cannot: the stem alone
        return [stem_name]
    finally:
        for hook in hooks:
            hook.remove()
    return list(dict.fromkeys(found)) or [stem_name]


def adapt_stem(model: nn.Module, in_channels: int) -> str | None:
    """Give the stem ``in_channels`` inputs in place; a note saying what changed, or None."""
    name, conv = stem_conv(model)
    have = conv.in_channels
    if have == in_channels:
        return None
    if conv.groups != 1:
        raise BnfixError(f"stem {name} is a grouped convolution; cannot adapt its input channels")
    readers = input_convolutions(model)
    if len(readers) > 1:
        # Each branch would adapt exactly, but the checkpoint would then fit no stock layout
        # (bnfix.load, fold and timm know one stem convolution): refused before anything is
        # written, rather than a file whose other branches still take the old channels.
        shown = ", ".join(readers[:3]) + (", …" if len(readers) > 3 else "")
        raise BnfixError(
            f"the stem has {len(readers)} parallel convolutions reading the input ({shown}); "
            f"bnfix adapts a single stem convolution, so it cannot give this model "
            f"{in_channels} input channel(s)"
        )
    with torch.no_grad():
        weight = adapt_weight(conv.weight.detach(), in_channels).clone()
    conv.weight = nn.Parameter(weight, requires_grad=conv.weight.requires_grad)
    conv.in_channels = in_channels
    how = "summed over RGB" if in_channels == 1 else "repeated ÷3"
    return f"{name}: {have} -> {in_channels} input channels ({how})"
