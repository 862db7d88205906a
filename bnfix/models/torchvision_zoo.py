"""Where torchvision models are recognised: its 2-D classifiers and video models with BatchNorm.

Each family's representative (its first member) is built on the meta device and its key
patterns compared with the checkpoint's; only members of families that cover the checkpoint's
patterns are built and compared exactly, the member with the checkpoint's key count first.
Layouts are cached for the life of the process: a cold recognition takes milliseconds to
~0.2 s (plus importing torchvision, ~1.4 s, deferred until it is needed), a warm one ~1 ms.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from functools import cache

from torch import Tensor, nn

from bnfix.models.families import (
    MIN_FAMILY_COVERAGE,
    Match,
    Variant,
    Zoo,
    by_key_count,
    coverage,
    layout,
    register,
    try_members,
    variant_layout,
)
from bnfix.models.layouts import Fit, Kwargs, Layout, empty_weights, shapes_of

ZOO = "torchvision"
_PAPER_AUDIO_NOTE = (
    "matches the layout of the paper's official audio ResNet-18 (1-channel stem, no classifier)"
)


def _plain(*members: tuple[str, int]) -> tuple[Variant, ...]:
    return tuple(Variant(name, keys) for name, keys in members)


_NO_AUX: Kwargs = (("aux_logits", False),)
_AUX_NOTE = "with auxiliary classifiers (aux_logits=True)"

# Each family's first member is its representative: its key patterns cover every member's
# (tests check this), so a checkpoint that fits a member is always covered by it. Families
# are tried in this order, the likeliest first.
FAMILIES: dict[str, tuple[Variant, ...]] = {
    "resnet": _plain(
        ("resnet18", 102),
        ("resnet34", 182),
        ("resnet50", 267),
        ("resnet101", 522),
        ("resnet152", 777),
        ("resnext50_32x4d", 267),
        ("resnext101_32x8d", 522),
        ("resnext101_64x4d", 522),
        ("wide_resnet50_2", 267),
        ("wide_resnet101_2", 522),
    ),
    "mobilenet_v2": _plain(("mobilenet_v2", 262)),
    "mobilenet_v3": _plain(("mobilenet_v3_small", 210), ("mobilenet_v3_large", 266)),
    "efficientnet": _plain(
        ("efficientnet_b0", 311),
        ("efficientnet_b1", 439),
        ("efficientnet_b2", 439),
        ("efficientnet_b3", 496),
        ("efficientnet_b4", 610),
        ("efficientnet_b5", 738),
        ("efficientnet_b6", 852),
        ("efficientnet_b7", 1037),
        ("efficientnet_v2_s", 672),
        ("efficientnet_v2_m", 963),
        ("efficientnet_v2_l", 1331),
    ),
    "regnet": _plain(
        ("regnet_y_800mf", 293),  # a Y model: its squeeze-excitation keys cover X and Y
        ("regnet_x_400mf", 357),
        ("regnet_x_800mf", 267),
        ("regnet_x_1_6gf", 297),
        ("regnet_x_3_2gf", 402),
        ("regnet_x_8gf", 372),
        ("regnet_x_16gf", 357),
        ("regnet_x_32gf", 372),
        ("regnet_y_400mf", 331),
        ("regnet_y_1_6gf", 540),
        ("regnet_y_3_2gf", 426),
        ("regnet_y_8gf", 350),
        ("regnet_y_16gf", 369),
        ("regnet_y_32gf", 407),
        ("regnet_y_128gf", 540),
    ),
    "densenet": _plain(
        ("densenet121", 606), ("densenet161", 806), ("densenet169", 846), ("densenet201", 1006)
    ),
    "vgg_bn": _plain(("vgg11_bn", 54), ("vgg13_bn", 66), ("vgg16_bn", 84), ("vgg19_bn", 102)),
    "mnasnet": _plain(
        ("mnasnet0_5", 262), ("mnasnet0_75", 262), ("mnasnet1_0", 262), ("mnasnet1_3", 262)
    ),
    "shufflenet_v2": _plain(
        ("shufflenet_v2_x0_5", 282),
        ("shufflenet_v2_x1_0", 282),
        ("shufflenet_v2_x1_5", 282),
        ("shufflenet_v2_x2_0", 282),
    ),
    "googlenet": (
        Variant("googlenet", 305, note=_AUX_NOTE),
        Variant("googlenet", 287, _NO_AUX),
    ),
    "inception_v3": (
        Variant("inception_v3", 484, note=_AUX_NOTE),
        Variant("inception_v3", 472, _NO_AUX),
    ),
    # Video (torchvision.models.video): Conv3d stems, BatchNorm3d. R(2+1)D's factorised
    # blocks (conv1.0.0 / conv1.0.3) cover the plain 3-D ones of R3D and MC3.
    "video_resnet": _plain(("r2plus1d_18", 187), ("r3d_18", 102), ("mc3_18", 102)),
    "s3d": _plain(("s3d", 387)),
}

# Every member's stem weight key, per family (tests check it). A checkpoint without it cannot
# fit any member, so the family is skipped before its representative is built: a timm or
# unrelated checkpoint builds few torchvision models, or none.
STEM_KEYS: dict[str, str] = {
    "resnet": "conv1.weight",
    "mobilenet_v2": "features.0.0.weight",
    "mobilenet_v3": "features.0.0.weight",
    "efficientnet": "features.0.0.weight",
    "regnet": "stem.0.weight",
    "densenet": "features.conv0.weight",
    "vgg_bn": "features.0.weight",
    "mnasnet": "layers.0.weight",
    "shufflenet_v2": "conv1.0.weight",
    "googlenet": "conv1.conv.weight",
    "inception_v3": "Conv2d_1a_3x3.conv.weight",
    "video_resnet": "stem.0.weight",
    "s3d": "features.0.0.0.weight",
}


@cache
def names() -> frozenset[str]:
    """The classification and video models this torchvision can build."""
    import torchvision
    from torchvision.models import list_models

    return frozenset(
        list_models(module=torchvision.models) + list_models(module=torchvision.models.video)
    )


def families() -> dict[str, tuple[Variant, ...]]:
    """The catalogue, restricted to the models the installed torchvision has."""
    available = names()
    found = {f: tuple(v for v in vs if v.name in available) for f, vs in FAMILIES.items()}
    return {f: vs for f, vs in found.items() if vs}


def construct(name: str, kwargs: Kwargs) -> nn.Module:
    """Build a torchvision model with meta weights, quietly (googlenet/inception warn)."""
    import torchvision

    with warnings.catch_warnings(), empty_weights():
        warnings.simplefilter("ignore", FutureWarning)
        return torchvision.models.get_model(name, **dict(kwargs))


def _variant_notes(variant: Variant, result: Fit, renamed: bool) -> list[str]:
    said = [variant.note] if variant.note else []
    if variant.name in ("googlenet", "inception_v3") and result.in_channels == 3:
        said.append("built with transform_input=False (torchvision's ImageNet weights use True)")
    if variant.name == "resnet18" and result.in_channels == 1 and result.head_missing:
        said.append(_PAPER_AUDIO_NOTE)
    if renamed:
        said.append("legacy DenseNet key names (norm.1 → norm1) mapped to torchvision's")
    return said


register(Zoo(ZOO, "", construct, _variant_notes))


def torchvision_layout(name: str, kwargs: Kwargs = ()) -> Layout:
    """The layout of a torchvision model (cached)."""
    return variant_layout(ZOO, name, kwargs)


def variants_named(name: str) -> list[Variant]:
    """The catalogue's configurations of ``name``, or a plain one for models outside it."""
    found = [v for vs in FAMILIES.values() for v in vs if v.name == name]
    return found or [Variant(name, keys=0)]


def search(
    canonical: Mapping[str, Tensor],
    patterns: set[str],
    renamed: bool,
    closest: list[tuple[int, str]],
) -> Match | None:
    """Try families that fully cover the checkpoint's patterns, then those that mostly do.

    Representatives are built lazily and only for families whose stem key the checkpoint
    has, so a ResNet checkpoint builds only ResNets. The second pass only matters should a
    future torchvision member outgrow its representative.
    """
    keys = len(shapes_of(canonical))
    partial = []
    for family, members in families().items():
        stem_key = STEM_KEYS.get(family)
        if stem_key is not None and stem_key not in canonical:
            continue
        covers = coverage(patterns, layout(members[0]).patterns)
        if covers == 1.0:
            match = try_members(canonical, by_key_count(members, keys), renamed, closest)
            if match is not None:
                return match
        elif covers >= MIN_FAMILY_COVERAGE:
            partial.append(members)
    for members in partial:
        match = try_members(canonical, by_key_count(members, keys), renamed, closest)
        if match is not None:
            return match
    return None
