"""Zoo-independent recognition: variants grouped in families, fitted one by one.

A *zoo* (torchvision, timm) knows how to construct a named model on the meta device; a
*variant* is one buildable configuration of it (a name plus keyword arguments); a *family* is
a group of variants whose key patterns (digits blanked) are covered by the family's
representatives, so that one comparison of patterns rules a whole family in or out before
any member is built. Within a family, members are tried nearest key count first.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache

from torch import Tensor, nn

from bnfix.models.layouts import (
    Fit,
    Kwargs,
    Layout,
    Mismatch,
    Recognition,
    checkpoint_classes,
    checkpoint_notes,
    fit,
    layout_of,
    notes,
    shapes_of,
)

# A family is tried in the first pass when its representatives have every key pattern of the
# checkpoint, in the second when they have at least this share of them.
MIN_FAMILY_COVERAGE = 0.8


@dataclass(frozen=True)
class Zoo:
    """A library of models bnfix builds by name (never with downloaded weights)."""

    name: str  # "torchvision", "timm": also how notes name the stock model
    prefix: str  # what a reported name starts with: "" for torchvision, "timm:" for timm
    construct: Callable[[str, Kwargs], nn.Module]  # on the meta device, quietly
    variant_notes: Callable[[Variant, Fit, bool], list[str]]


ZOOS: dict[str, Zoo] = {}


def register(zoo: Zoo) -> Zoo:
    ZOOS[zoo.name] = zoo
    return zoo


@dataclass(frozen=True)
class Variant:
    """One buildable configuration.

    ``keys`` is the number of state-dict keys it has (batch counters aside) in the library
    version the catalogue was written for. It only orders the members tried within a family,
    so that an EfficientNet-V2-L is built first rather than last; a stale count costs time,
    never a wrong answer.
    """

    name: str
    keys: int
    kwargs: Kwargs = ()
    note: str | None = None
    zoo: str = "torchvision"

    @property
    def label(self) -> str:
        """The name a report shows and ``--arch`` accepts: ``resnet50``, ``timm:resnet50d``."""
        return ZOOS[self.zoo].prefix + self.name


@cache
def variant_layout(zoo: str, name: str, kwargs: Kwargs) -> Layout:
    """The layout of a zoo model, built once per process on the meta device."""
    return layout_of(ZOOS[zoo].construct(name, kwargs))


def layout(variant: Variant, kwargs: Kwargs | None = None) -> Layout:
    return variant_layout(variant.zoo, variant.name, variant.kwargs if kwargs is None else kwargs)


@dataclass(frozen=True)
class Match:
    """A variant that fits, with what is needed to build it."""

    variant: Variant
    kwargs: Kwargs  # the variant's, plus num_classes when the checkpoint's differs
    fit: Fit
    recognition: Recognition

    def build(self) -> nn.Module:
        """The model, constructed on the meta device (its weights come from the checkpoint)."""
        return ZOOS[self.variant.zoo].construct(self.variant.name, self.kwargs)


def fit_variant(
    state_dict: Mapping[str, Tensor], variant: Variant, renamed: bool = False
) -> Match | Mismatch:
    """Fit a (canonical) checkpoint to one variant."""
    shapes = shapes_of(state_dict)
    zoo = ZOOS[variant.zoo]
    default = layout(variant)
    kwargs = variant.kwargs
    classes = checkpoint_classes(shapes, default)
    if classes is not None and classes != default.head_out:
        # Rebuild rather than tolerate: auxiliary heads (googlenet, inception) resize too.
        kwargs = (*kwargs, ("num_classes", classes))
    result = fit(shapes, layout(variant, kwargs))
    if isinstance(result, Mismatch):
        return result
    said = notes(result, default, zoo.name)
    said += zoo.variant_notes(variant, result, renamed)
    said += checkpoint_notes(state_dict, default)
    recognition = Recognition(variant.label, result.in_channels, result.num_classes, tuple(said))
    return Match(variant, kwargs, result, recognition)


def coverage(patterns: set[str], covered: frozenset[str]) -> float:
    """The share of the checkpoint's key patterns that a family's representatives have."""
    return len(patterns & covered) / len(patterns)


def by_key_count(members: tuple[Variant, ...], keys: int) -> list[Variant]:
    """Members with the checkpoint's number of keys first (see ``Variant.keys``); ties keep
    the catalogue's order, which puts the usual name before its look-alikes."""
    return sorted(members, key=lambda v: abs(v.keys - keys))


def try_members(
    state_dict: Mapping[str, Tensor],
    members: list[Variant],
    renamed: bool,
    closest: list[tuple[int, str]],
) -> Match | None:
    """The first member that fits, if any; each misfit is appended to ``closest``."""
    for variant in members:
        result = fit_variant(state_dict, variant, renamed)
        if isinstance(result, Match):
            return result
        closest.append((result.size, f"{variant.label}: {result.describe()}"))
    return None
