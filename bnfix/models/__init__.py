"""Models: recognising a checkpoint's architecture from its keys, building it, its stem.

- :mod:`bnfix.models.layouts`: what a state dict looks like; whether a checkpoint fits a model
  (stem width and classifier tolerated); building on the meta device (``empty_weights``).
- :mod:`bnfix.models.families`: the zoo-independent search (families, representatives,
  variants tried nearest key count first).
- :mod:`bnfix.models.torchvision_zoo`: where torchvision's 2-D classifiers and video models are
  recognised.
- :mod:`bnfix.models.timm_zoo` (+ the generated ``timm_catalogue``): where timm's BatchNorm
  families are recognised, reported as ``timm:NAME``.
- :mod:`bnfix.models.recognition`: across zoos, torchvision first (the precedence rule).
- :mod:`bnfix.models.build`: building recognised, named or user-supplied models with the
  checkpoint's tensors.
- :mod:`bnfix.models.stem`: the first convolution (1-, 2- or 3-D) and its modality adaptation.
"""

from __future__ import annotations

from bnfix.models.build import build_model, create_model, is_builtin, load_weights
from bnfix.models.layouts import Recognition, canonical_keys, empty_weights
from bnfix.models.recognition import closest_model, recognise
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
    "Recognition",
    "adapt_stem",
    "adapt_weight",
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
