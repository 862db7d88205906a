"""Modality adaptation of a model's stem: moved to :mod:`bnfix.models.stem` (re-exported here
so existing imports keep working)."""

from __future__ import annotations

from bnfix.models.stem import (
    MODALITY_CHANNELS,
    adapt_stem,
    adapt_weight,
    stem_conv,
    stem_dimensions,
    stem_in_channels,
)

__all__ = [
    "MODALITY_CHANNELS",
    "adapt_stem",
    "adapt_weight",
    "stem_conv",
    "stem_dimensions",
    "stem_in_channels",
]
