"""Rebuild a runnable model from any checkpoint bnfix reads or writes: plain, ABRi-repaired
(ours or the official layout), folded, with an adapted stem.

The architecture comes from ``arch``, else from bnfix's metadata when it names a built-in
architecture, else from recognising the keys; ABRi blocks are recreated where the keys say so,
and the weights load strictly. A ``pkg.module:factory`` written in a file's metadata is never
imported on the file's word: building it runs that module's code, so the user must name it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from bnfix.abri import convert
from bnfix.abri_keys import ALPHA, abri_prefixes, plain_view
from bnfix.checkpoint import Checkpoint, load_checkpoint
from bnfix.errors import BnfixError, one_line
from bnfix.models import Recognition, build_model, is_builtin, load_weights


def load(
    path: str | Path,
    arch: str | None = None,
    select: str | None = None,
    *,
    option: str = "--arch",
) -> nn.Module:
    """The model stored in ``path``, on the CPU in eval mode, weights loaded strictly.

    ``option`` names the setting ``arch`` comes from (``--arch``, a config key), for messages.
    """
    ckpt = load_checkpoint(path, select)
    model, _ = model_from_state(ckpt.state_dict, architecture(ckpt, arch, option), option=option)
    return model


def recorded_architecture(ckpt: Checkpoint) -> str | None:
    """The architecture bnfix wrote into the file's metadata, if any."""
    return ckpt.metadata.get("architecture") or None


def architecture(ckpt: Checkpoint, arch: str | None, option: str = "--arch") -> str | None:
    """The architecture to build ``ckpt`` with: the user's ``arch``, else the recorded one when
    it is built-in, else None (recognise from the keys).

    A recorded ``pkg.module:factory`` is refused rather than imported: a checkpoint is data,
    and data must never decide which code runs.
    """
    if arch:
        return arch
    recorded = recorded_architecture(ckpt)
    if recorded is None:
        return None
    if is_builtin(recorded):
        return recorded
    allow = f"{option} {recorded}"
    if option == "--arch":
        allow += f" (in Python: bnfix.load(path, arch={recorded!r}))"
    raise BnfixError(
        f"its metadata asks for the factory {recorded!r}; bnfix never imports code a file "
        f"names: pass {allow} to allow it",
        ckpt.path,
    )


def model_from_state(
    state: Mapping[str, torch.Tensor], arch: str | None = None, *, option: str = "--arch"
) -> tuple[nn.Module, Recognition]:
    """Build the architecture from the plain view of ``state``, recreate its ABRi blocks, load."""
    blocks = abri_prefixes(state)
    model, recognition = build_model(plain_view(state), arch, option=option)
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
