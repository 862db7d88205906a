"""Recognising and building architectures: moved to the :mod:`bnfix.models` subpackage.

This module re-exports its public names so that existing imports keep working:
recognition per zoo lives in :mod:`bnfix.models.torchvision_zoo` and
:mod:`bnfix.models.timm_zoo`, the cross-zoo rule in :mod:`bnfix.models.recognition`, building
in :mod:`bnfix.models.build`, layouts in :mod:`bnfix.models.layouts`, the stem in
:mod:`bnfix.models.stem`.
"""

from __future__ import annotations

from bnfix.models.build import build_model, create_model, is_builtin, load_weights
from bnfix.models.layouts import Recognition, canonical_keys, empty_weights
from bnfix.models.recognition import closest_model, recognise
from bnfix.models.stem import stem_conv, stem_dimensions, stem_in_channels

__all__ = [
    "Recognition",
    "build_model",
    "canonical_keys",
    "closest_model",
    "create_model",
    "empty_weights",
    "is_builtin",
    "load_weights",
    "recognise",
    "stem_conv",
    "stem_dimensions",
    "stem_in_channels",
]
