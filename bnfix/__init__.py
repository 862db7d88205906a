"""bnfix: find and repair dead BatchNorm channels in pretrained CNN checkpoints."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

try:
    __version__ = version("bnfix")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"


def load(
    path: str | Path,
    arch: str | None = None,
    select: str | None = None,
    *,
    option: str = "--arch",
) -> torch.nn.Module:
    """Rebuild the model stored in any checkpoint bnfix reads or writes (see bnfix.loading).

    A ``pkg.module:factory`` recorded in the file is used only when passed as ``arch``: a
    file never decides which code runs. torch is imported only here, so ``import bnfix`` and
    ``bnfix --help`` stay fast.
    """
    from bnfix.loading import load as _load

    return _load(path, arch=arch, select=select, option=option)
