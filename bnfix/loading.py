"""Rebuild a runnable model from any checkpoint bnfix reads or writes: plain, ABRi-repaired
(ours or the official layout), folded, with an adapted stem.

The architecture comes from ``arch``, else from bnfix's metadata, else from recognising the
keys; ABRi blocks are recreated where the keys say so, and the weights load strictly.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from bnfix.abri import convert
from bnfix.abri_keys import ALPHA, abri_prefixes, plain_view
from bnfix.architectures import Recognition, build_model, load_weights
from bnfix.checkpoint import load_checkpoint
from bnfix.errors import BnfixError, one_line


def load(path: str | Path, arch: str | None = None, select: str | None = None) -> nn.Module:
    """The model stored in ``path``, on the CPU in eval mode, weights loaded strictly."""
    ckpt = load_checkpoint(path, select)
    model, _ = model_from_state(ckpt.state_dict, arch or ckpt.metadata.get("architecture"))
    return model


def model_from_state(
    state: Mapping[str, torch.Tensor], arch: str | None = None
) -> tuple[nn.Module, Recognition]:
    """Build the architecture from the plain view of ``state``, recreate its ABRi blocks, load."""
    blocks = abri_prefixes(state)
    model, recognition = build_model(plain_view(state), arch)
    if not blocks:
        return model, recognition
    for per in ("layer", "channel"):
        names = [b for b in blocks if (state[f"{b}.{ALPHA}"].numel() == 1) == (per == "layer")]
        if names:
            convert(model, per=per, only=names)
    try:  # the same strict load as build_model's (batch counters old files lack become 0)
        return load_weights(model, state), recognition
    except RuntimeError as exc:
        raise BnfixError(f"the ABRi blocks do not load strictly: {one_line(exc)}") from None
