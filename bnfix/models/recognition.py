"""Which model a state dict is, from its keys and shapes alone, across every zoo.

**Precedence**: torchvision first, timm only when no torchvision model fits. Many timm models
have exactly torchvision's keys and shapes (timm's ``resnet50``, ``resnext50_32x4d``,
``densenet121``...), and the same weights run the same in both, so a plain torchvision
checkpoint is always reported by its torchvision name; ``timm:NAME`` is reported for what only
timm builds (``resnet50d``, ``efficientnet_b0``'s timm layout, ``regnety_008``, ...). Pass
``--arch timm:NAME`` to have a torchvision-compatible checkpoint built by timm instead.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from bnfix.models import timm_zoo, torchvision_zoo
from bnfix.models.families import Match, try_members
from bnfix.models.layouts import Recognition, canonical_keys, gc_paused, pattern, shapes_of

__all__ = ["closest_model", "find", "recognise"]


def find(state_dict: Mapping[str, Tensor]) -> tuple[Match | None, str | None]:
    """The first model that fits, or None and a hint naming the closest one and how it
    differs (keys missing / unexpected, the first differing shape)."""
    with gc_paused():
        canonical, renamed = canonical_keys(state_dict)
        patterns = {pattern(k) for k in shapes_of(canonical)}
        if not patterns:
            return None, None
        closest: list[tuple[int, str]] = []
        match = None
        hits = timm_zoo.signature_hits(canonical)
        if not timm_zoo.torchvision_may_fit(hits):  # only timm can fit: skip torchvision
            match = try_members(canonical, hits, renamed, closest)
        if match is None:
            match = torchvision_zoo.search(canonical, patterns, renamed, closest)
        if match is None:
            match = timm_zoo.search(canonical, patterns, renamed, closest)
        if match is not None:
            return match, None
        return None, min(closest)[1] if closest else None


def recognise(state_dict: Mapping[str, Tensor]) -> Recognition | None:
    """Which torchvision (2-D or video) or timm model the keys and shapes describe; None when
    nothing fits. Only shapes are read, so meta tensors work too."""
    match, _ = find(state_dict)
    return None if match is None else match.recognition


def closest_model(state_dict: Mapping[str, Tensor]) -> str | None:
    """For a checkpoint nothing fits: the closest model and how it differs, in one line
    (``"timm:resnet50d: 3 keys missing (e.g. ...), 0 keys unexpected, ..."``); else None."""
    match, hint = find(state_dict)
    return None if match is not None else hint
