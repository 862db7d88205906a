"""Recognise a torchvision classifier from a state dict alone, and build it with those weights.

A probe scan, a repair with a probe and fine-tuning need a runnable module, but users hand us
bare checkpoints. The keys and shapes of a checkpoint pin down a torchvision model almost
uniquely, so we compare them with the layouts of the models torchvision can build, tolerating
the two changes that cross-modal re-use makes: a stem with another number of input channels
(an audio ResNet-18 has ``conv1.weight`` of shape [64, 1, 7, 7]) and a classifier that is
missing or has another number of outputs.

Layouts come from models built on the meta device (no memory, no initialisation). Building all
80 torchvision models that way still takes seconds, so candidates are prefiltered by family:
one representative per family is built and its key *patterns* (digits replaced by ``#``) are
compared with the checkpoint's; only members of families that cover the checkpoint's patterns
are built and compared exactly, the member with the checkpoint's key count first. Layouts are
cached for the life of the process: a cold recognition takes milliseconds to ~0.2 s (plus
importing torchvision, ~1.4 s, which this module defers until it is needed), a warm one ~1 ms.

The stem is the first ``nn.Conv2d`` and the classifier the last ``nn.Linear`` in module order,
found generically so that ``conv1``, ``features.0.0``, ``stem.0``, ``features.conv0`` and
``Conv2d_1a_3x3.conv`` all work without a table of key names.
"""

from __future__ import annotations

import difflib
import gc
import importlib
import importlib.util
import re
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from itertools import chain

import torch
from torch import Tensor, nn

from bnfix.errors import BnfixError, one_line

__all__ = [
    "Recognition",
    "build_model",
    "canonical_keys",
    "create_model",
    "empty_weights",
    "is_builtin",
    "load_weights",
    "recognise",
    "stem_in_channels",
]

Shape = tuple[int, ...]
Kwargs = tuple[tuple[str, object], ...]

_BATCH_COUNTER = "num_batches_tracked"
_MIN_FAMILY_COVERAGE = 0.8
_TORCHVISION = "torchvision"
_PAPER_AUDIO_NOTE = (
    "matches the layout of the paper's official audio ResNet-18 (1-channel stem, no classifier)"
)
# torchvision's own remapping of pre-0.3 DenseNet keys ("denselayer1.norm.1.weight").
_LEGACY_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


@dataclass(frozen=True)
class Recognition:
    """What a checkpoint is, and how it differs from the stock model."""

    name: str  # e.g. "resnet18", or "pkg.mod:factory", "timm:resnet50"
    in_channels: int  # the checkpoint's stem input channels (0 when the model has no Conv2d)
    num_classes: int | None  # None when the classifier is missing
    notes: tuple[str, ...] = ()  # human-readable remarks for the report


# --------------------------------------------------------------------------------------------
# Building without weights


_INIT_FUNCTIONS = (
    "uniform_",
    "normal_",
    "trunc_normal_",
    "constant_",
    "ones_",
    "zeros_",
    "eye_",
    "dirac_",
    "xavier_uniform_",
    "xavier_normal_",
    "kaiming_uniform_",
    "kaiming_normal_",
    "orthogonal_",
    "sparse_",
)


def _keep(tensor: Tensor, *_args: object, **_kwargs: object) -> Tensor:
    """An initialiser that leaves the tensor alone (its values are discarded anyway)."""
    return tensor


@contextmanager
def empty_weights() -> Iterator[None]:
    """Construct modules whose parameters and buffers all live on the meta device.

    ``with torch.device("meta")`` is not enough: RegNet computes its widths with torch ops
    while it is constructed, which fails on meta tensors. Instead, tensors are created as usual
    (``torch.empty`` does not touch memory) and moved to meta the moment a module registers
    them, as accelerate's ``init_empty_weights`` does. The ``nn.init`` functions become no-ops
    meanwhile, which halves construction time. Not thread-safe: it patches classes globally.
    """
    register_parameter = nn.Module.register_parameter
    register_buffer = nn.Module.register_buffer
    initialisers = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS}

    def register_meta_parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register_parameter(module, name, param)
        if param is not None:
            registered = module._parameters[name]
            module._parameters[name] = type(registered)(
                registered.to("meta"), requires_grad=registered.requires_grad
            )

    def register_meta_buffer(
        module: nn.Module, name: str, tensor: Tensor | None, persistent: bool = True
    ) -> None:
        register_buffer(module, name, tensor, persistent)
        if tensor is not None:
            module._buffers[name] = module._buffers[name].to("meta")

    nn.Module.register_parameter = register_meta_parameter  # type: ignore[method-assign]
    nn.Module.register_buffer = register_meta_buffer  # type: ignore[method-assign]
    for name in _INIT_FUNCTIONS:
        setattr(nn.init, name, _keep)
    try:
        yield
    finally:
        nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]
        nn.Module.register_buffer = register_buffer  # type: ignore[method-assign]
        for name, function in initialisers.items():
            setattr(nn.init, name, function)


# --------------------------------------------------------------------------------------------
# Layouts: what a model's state dict looks like


def _is_batch_counter(key: str) -> bool:
    """``num_batches_tracked`` is absent from old checkpoints, so matching ignores it."""
    return key == _BATCH_COUNTER or key.endswith("." + _BATCH_COUNTER)


def _pattern(key: str) -> str:
    """A key with its numbers blanked: the same for every depth and width of a family."""
    return re.sub(r"\d+", "#", key)


@dataclass(frozen=True)
class _Layout:
    """Keys and shapes of a model (batch counters aside), plus where its stem and head are."""

    shapes: Mapping[str, Shape]
    batch_counters: frozenset[str]
    stem: str | None  # module path of the first nn.Conv2d
    stem_in: int
    stem_groups: int
    head: str | None  # module path of the last nn.Linear
    head_out: int | None
    head_bias: bool
    patterns: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "patterns", frozenset(_pattern(k) for k in self.shapes))

    @property
    def stem_key(self) -> str | None:
        return None if self.stem is None else f"{self.stem}.weight"

    @property
    def head_keys(self) -> tuple[str, ...]:
        if self.head is None:
            return ()
        bias = (f"{self.head}.bias",) if self.head_bias else ()
        return (f"{self.head}.weight", *bias)


def _layout_of(model: nn.Module) -> _Layout:
    """Read a (possibly meta) model's layout."""
    state = model.state_dict()
    modules = [(n, m) for n, m in model.named_modules() if f"{n}.weight" in state]
    convs = [(n, m) for n, m in modules if isinstance(m, nn.Conv2d)]
    linears = [(n, m) for n, m in modules if isinstance(m, nn.Linear)]
    stem_name, stem = convs[0] if convs else (None, None)
    head_name, head = linears[-1] if linears else (None, None)
    return _Layout(
        shapes={k: tuple(v.shape) for k, v in state.items() if not _is_batch_counter(k)},
        batch_counters=frozenset(k for k in state if _is_batch_counter(k)),
        stem=stem_name,
        stem_in=stem.in_channels if stem is not None else 0,
        stem_groups=stem.groups if stem is not None else 1,
        head=head_name,
        head_out=head.out_features if head is not None else None,
        head_bias=head is not None and head.bias is not None,
    )


# --------------------------------------------------------------------------------------------
# The torchvision catalogue


@dataclass(frozen=True)
class _Variant:
    """One buildable torchvision configuration.

    ``keys`` is the number of state-dict keys it has (batch counters aside) in torchvision
    0.29. It only orders the members tried within a family, so that an EfficientNet-V2-L is
    built first rather than last; a stale count costs time, never a wrong answer.
    """

    name: str
    keys: int
    kwargs: Kwargs = ()
    note: str | None = None


def _plain(*members: tuple[str, int]) -> tuple[_Variant, ...]:
    return tuple(_Variant(name, keys) for name, keys in members)


_NO_AUX: Kwargs = (("aux_logits", False),)
_AUX_NOTE = "with auxiliary classifiers (aux_logits=True)"

# Each family's first member is its representative: its key patterns cover every member's
# (tests check this), so a checkpoint that fits a member is always covered by it. Families
# are tried in this order, the likeliest first.
_FAMILIES: dict[str, tuple[_Variant, ...]] = {
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
        _Variant("googlenet", 305, note=_AUX_NOTE),
        _Variant("googlenet", 287, _NO_AUX),
    ),
    "inception_v3": (
        _Variant("inception_v3", 484, note=_AUX_NOTE),
        _Variant("inception_v3", 472, _NO_AUX),
    ),
}


@cache
def _torchvision_names() -> frozenset[str]:
    """The classification models this torchvision can build."""
    import torchvision

    return frozenset(torchvision.models.list_models(module=torchvision.models))


def _families() -> dict[str, tuple[_Variant, ...]]:
    """The catalogue, restricted to the models the installed torchvision has."""
    available = _torchvision_names()
    families = {f: tuple(v for v in vs if v.name in available) for f, vs in _FAMILIES.items()}
    return {f: vs for f, vs in families.items() if vs}


def _construct(name: str, kwargs: Kwargs) -> nn.Module:
    """Build a torchvision model with meta weights, quietly (googlenet/inception warn)."""
    import torchvision

    with warnings.catch_warnings(), empty_weights():
        warnings.simplefilter("ignore", FutureWarning)
        return torchvision.models.get_model(name, **dict(kwargs))


@cache
def _torchvision_layout(name: str, kwargs: Kwargs) -> _Layout:
    return _layout_of(_construct(name, kwargs))


# --------------------------------------------------------------------------------------------
# Fitting a checkpoint to a layout


@dataclass(frozen=True)
class _Fit:
    """A checkpoint fits a layout, possibly with another stem width or classifier size."""

    layout: _Layout
    in_channels: int
    num_classes: int | None

    @property
    def stem_changed(self) -> bool:
        return self.in_channels != self.layout.stem_in

    @property
    def head_missing(self) -> bool:
        return self.layout.head is not None and self.num_classes is None

    @property
    def head_resized(self) -> bool:
        return self.num_classes is not None and self.num_classes != self.layout.head_out


@dataclass(frozen=True)
class _Mismatch:
    """Why a checkpoint does not fit a layout, for the error message."""

    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    misshaped: tuple[tuple[str, Shape, Shape], ...]  # key, checkpoint shape, model shape

    @property
    def size(self) -> int:
        return len(self.missing) + len(self.unexpected) + len(self.misshaped)

    def describe(self) -> str:
        """One line: the three counts, each with up to two examples."""

        def part(label: str, items: list[str]) -> str:
            count = f"{len(items)} {'key' if len(items) == 1 else 'keys'} {label}"
            return f"{count} (e.g. {', '.join(items[:2])})" if items else count

        shaped = [
            f"{k}: checkpoint {list(got)} vs model {list(want)}" for k, got, want in self.misshaped
        ]
        return ", ".join(
            (
                part("missing", list(self.missing)),
                part("unexpected", list(self.unexpected)),
                part("mis-shaped", shaped),
            )
        )


def _stem_fits(got: Shape, want: Shape, layout: _Layout) -> bool:
    """Only the input-channel dimension of an ungrouped stem may differ."""
    return (
        layout.stem_groups == 1
        and len(got) == len(want) == 4
        and got[0] == want[0]
        and got[2:] == want[2:]
    )


def _checkpoint_classes(shapes: Mapping[str, Shape], layout: _Layout) -> int | None:
    """The classifier size the checkpoint has, when its head has the model's input size."""
    if layout.head is None:
        return None
    got = shapes.get(f"{layout.head}.weight")
    want = layout.shapes[f"{layout.head}.weight"]
    if got is None or len(got) != 2 or got[1] != want[1]:
        return None
    return got[0]


def _fit(shapes: Mapping[str, Shape], layout: _Layout) -> _Fit | _Mismatch:
    """Compare a checkpoint's shapes (batch counters removed) with a model's layout."""
    head_keys = layout.head_keys
    missing = [k for k in layout.shapes if k not in shapes]
    head_missing = bool(head_keys) and all(k in missing for k in head_keys)
    if head_missing:
        missing = [k for k in missing if k not in head_keys]
    unexpected = [k for k in shapes if k not in layout.shapes]
    in_channels = layout.stem_in
    num_classes = None if head_missing else _checkpoint_classes(shapes, layout)
    if not head_missing and num_classes is None:
        num_classes = layout.head_out
    misshaped: list[tuple[str, Shape, Shape]] = []
    for key, want in layout.shapes.items():
        got = shapes.get(key)
        if got is None or got == want:
            continue
        if key == layout.stem_key and _stem_fits(got, want, layout):
            in_channels = got[1]
        elif key in head_keys and got == _head_shape(key, layout, num_classes):
            pass
        else:
            misshaped.append((key, got, want))
    if missing or unexpected or misshaped:
        return _Mismatch(tuple(missing), tuple(unexpected), tuple(misshaped))
    return _Fit(layout, in_channels, num_classes)


def _head_shape(key: str, layout: _Layout, num_classes: int | None) -> Shape | None:
    """The shape a head tensor must have for ``num_classes`` outputs."""
    want = layout.shapes[key]
    if num_classes is None:
        return None
    return (num_classes, *want[1:])


def _notes(fit: _Fit, default: _Layout, origin: str) -> list[str]:
    """Say how the checkpoint differs from the stock model (``default``)."""
    notes = []
    if fit.in_channels != default.stem_in:
        notes.append(f"{fit.in_channels}-channel stem ({origin} has {default.stem_in})")
    if fit.head_missing:
        notes.append(f"no classifier ({fit.layout.head}.* absent)")
    elif fit.num_classes != default.head_out:
        notes.append(f"classifier has {fit.num_classes} outputs ({origin}: {default.head_out})")
    return notes


def _checkpoint_notes(state_dict: Mapping[str, Tensor], layout: _Layout) -> list[str]:
    """Remarks about the tensors themselves: missing batch counters, non-float32 weights."""
    notes = []
    if layout.batch_counters and not any(_is_batch_counter(k) for k in state_dict):
        notes.append(f"no {_BATCH_COUNTER} (older checkpoint); set to 0 when loading")
    dtypes = {
        str(v.dtype).removeprefix("torch.") for v in state_dict.values() if v.is_floating_point()
    }
    if dtypes - {"float32"}:
        notes.append(f"weights stored as {', '.join(sorted(dtypes))} (not float32)")
    return notes


def _shapes(state_dict: Mapping[str, Tensor]) -> dict[str, Shape]:
    return {k: tuple(v.shape) for k, v in state_dict.items() if not _is_batch_counter(k)}


def canonical_keys(state_dict: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], bool]:
    """Rename pre-0.3 DenseNet keys (``norm.1`` → ``norm1``) as torchvision itself does."""
    renamed = False
    result = {}
    for key, value in state_dict.items():
        legacy = _LEGACY_DENSENET_KEY.match(key)
        if legacy:
            key = legacy.group(1) + legacy.group(2)
            renamed = True
        result[key] = value
    return result, renamed


# --------------------------------------------------------------------------------------------
# Recognition


@dataclass(frozen=True)
class _Match:
    """A torchvision variant that fits, with what is needed to build it."""

    variant: _Variant
    kwargs: Kwargs  # the variant's, plus num_classes when the checkpoint's differs
    fit: _Fit
    recognition: Recognition


def _fit_variant(
    state_dict: Mapping[str, Tensor], variant: _Variant, renamed: bool = False
) -> _Match | _Mismatch:
    """Fit a (canonical) checkpoint to one torchvision variant."""
    shapes = _shapes(state_dict)
    default = _torchvision_layout(variant.name, variant.kwargs)
    kwargs = variant.kwargs
    classes = _checkpoint_classes(shapes, default)
    if classes is not None and classes != default.head_out:
        # Rebuild rather than tolerate: auxiliary heads (googlenet, inception) resize too.
        kwargs = (*kwargs, ("num_classes", classes))
    result = _fit(shapes, _torchvision_layout(variant.name, kwargs))
    if isinstance(result, _Mismatch):
        return result
    notes = _notes(result, default, _TORCHVISION)
    notes += _variant_notes(variant, result, renamed)
    notes += _checkpoint_notes(state_dict, default)
    recognition = Recognition(variant.name, result.in_channels, result.num_classes, tuple(notes))
    return _Match(variant, kwargs, result, recognition)


def _variant_notes(variant: _Variant, fit: _Fit, renamed: bool) -> list[str]:
    notes = [variant.note] if variant.note else []
    if variant.name in ("googlenet", "inception_v3") and fit.in_channels == 3:
        notes.append("built with transform_input=False (torchvision's ImageNet weights use True)")
    if variant.name == "resnet18" and fit.in_channels == 1 and fit.head_missing:
        notes.append(_PAPER_AUDIO_NOTE)
    if renamed:
        notes.append("legacy DenseNet key names (norm.1 → norm1) mapped to torchvision's")
    return notes


def _coverage(patterns: set[str], representative: _Variant) -> float:
    """The share of the checkpoint's key patterns that the family representative has."""
    layout = _torchvision_layout(representative.name, representative.kwargs)
    return len(patterns & layout.patterns) / len(patterns)


def _by_key_count(members: tuple[_Variant, ...], keys: int) -> list[_Variant]:
    """Members with the checkpoint's number of keys first (see ``_Variant.keys``)."""
    return sorted(members, key=lambda v: abs(v.keys - keys))


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Keep the cyclic garbage collector out of a burst of model constructions.

    Constructing modules allocates enough objects to trigger full collections, and each one
    walks every object torch has created (about 150 ms here), which doubled the time of a cold
    recognition. The modules we build and drop are freed by reference counting anyway.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _recognise(state_dict: Mapping[str, Tensor]) -> tuple[_Match | None, str | None]:
    """The first torchvision variant that fits, or None and a hint naming the closest one."""
    with _gc_paused():
        return _search(state_dict)


def _search(state_dict: Mapping[str, Tensor]) -> tuple[_Match | None, str | None]:
    """Try families that fully cover the checkpoint's patterns, then those that mostly do.

    Representatives are built lazily, so a ResNet checkpoint builds only ResNets. The second
    pass only matters should a future torchvision member outgrow its representative.
    """
    canonical, renamed = canonical_keys(state_dict)
    shapes = _shapes(canonical)
    patterns = {_pattern(k) for k in shapes}
    if not patterns:
        return None, None
    closest: list[tuple[int, str]] = []
    partial = []
    for members in _families().values():
        covers = _coverage(patterns, members[0])
        if covers == 1.0:
            match = _try_family(canonical, members, renamed, closest)
            if match is not None:
                return match, None
        elif covers >= _MIN_FAMILY_COVERAGE:
            partial.append(members)
    for members in partial:
        match = _try_family(canonical, members, renamed, closest)
        if match is not None:
            return match, None
    return None, min(closest)[1] if closest else None


def _try_family(
    state_dict: Mapping[str, Tensor],
    members: tuple[_Variant, ...],
    renamed: bool,
    closest: list[tuple[int, str]],
) -> _Match | None:
    """The member that fits, if any; each misfit is appended to ``closest`` for the hint."""
    for variant in _by_key_count(members, len(_shapes(state_dict))):
        result = _fit_variant(state_dict, variant, renamed)
        if isinstance(result, _Match):
            return result
        closest.append((result.size, f"{variant.name}: {result.describe()}"))
    return None


def recognise(state_dict: Mapping[str, Tensor]) -> Recognition | None:
    """Which torchvision classifier the keys and shapes describe; None when nothing fits.

    Only shapes are read, so meta tensors work too.
    """
    match, _ = _recognise(state_dict)
    return None if match is None else match.recognition


# --------------------------------------------------------------------------------------------
# Building


def _adapt(model: nn.Module, fit: _Fit) -> None:
    """Give the model the checkpoint's stem width and classifier, with placeholder tensors.

    The stem and head are changed in place (only their sizes and weights), so subclasses of
    ``nn.Conv2d``/``nn.Linear`` keep their behaviour; ``load_state_dict(assign=True)`` then
    puts the checkpoint's tensors in the placeholders' places.
    """
    layout = fit.layout
    if fit.stem_changed and layout.stem is not None:
        conv = model.get_submodule(layout.stem)
        conv.in_channels = fit.in_channels
        shape = (conv.out_channels, fit.in_channels, *conv.kernel_size)
        conv.weight = nn.Parameter(torch.empty(shape, device="meta"))
    if fit.head_missing and layout.head is not None:
        model.set_submodule(layout.head, nn.Identity())
    elif fit.head_resized and layout.head is not None and fit.num_classes is not None:
        linear = model.get_submodule(layout.head)
        linear.out_features = fit.num_classes
        linear.weight = nn.Parameter(
            torch.empty((fit.num_classes, linear.in_features), device="meta")
        )
        if linear.bias is not None:
            linear.bias = nn.Parameter(torch.empty((fit.num_classes,), device="meta"))


def load_weights(model: nn.Module, state_dict: Mapping[str, Tensor]) -> nn.Module:
    """Put the checkpoint's own tensors into the model (no copy), ready to run on the CPU.

    Batch counters the checkpoint lacks become 0 and ones the model lacks are dropped, so old
    checkpoints load strictly. No meta tensor may survive: that would be a bug here.
    """
    wanted = model.state_dict()
    tensors = OrderedDict(
        (k, v) for k, v in state_dict.items() if k in wanted or not _is_batch_counter(k)
    )
    # Module versions (MNASNet refuses to load without one): the layout matched the model's.
    tensors._metadata = wanted._metadata  # type: ignore[attr-defined]
    for key in wanted:
        if _is_batch_counter(key) and key not in tensors:
            tensors[key] = torch.zeros((), dtype=torch.long)
    model.load_state_dict(tensors, strict=True, assign=True)
    leftover = [
        name
        for name, tensor in chain(model.named_parameters(), model.named_buffers())
        if tensor.is_meta
    ]
    if leftover:
        raise RuntimeError(f"tensors left on the meta device after loading: {leftover[:3]}")
    return model.to("cpu").eval()


def _build_match(state_dict: Mapping[str, Tensor], match: _Match) -> tuple[nn.Module, Recognition]:
    model = _construct(match.variant.name, match.kwargs)
    _adapt(model, match.fit)
    canonical, _ = canonical_keys(state_dict)
    return load_weights(model, canonical), match.recognition


def _build_torchvision(
    state_dict: Mapping[str, Tensor], name: str, option: str = "--arch"
) -> tuple[nn.Module, Recognition]:
    """Build the named torchvision model, or say precisely why the checkpoint does not fit."""
    if name not in _torchvision_names():
        raise BnfixError(
            f"{option}: unknown architecture {name!r}: pass a torchvision model name "
            "(e.g. resnet50), pkg.module:factory or timm:NAME"
        )
    variants = [v for vs in _FAMILIES.values() for v in vs if v.name == name]
    variants = variants or [_Variant(name, keys=0)]
    canonical, renamed = canonical_keys(state_dict)
    mismatches = []
    for variant in variants:
        result = _fit_variant(canonical, variant, renamed)
        if isinstance(result, _Match):
            return _build_match(state_dict, result)
        mismatches.append(result)
    closest = min(mismatches, key=lambda m: m.size)
    raise BnfixError(
        f"{option} {name} does not fit this checkpoint: {closest.describe()}; "
        f"check the architecture or pass {option} pkg.module:factory"
    )


def _one_line(exc: BaseException) -> str:
    """The exception's type and message: a user's own factory raises, so the type helps."""
    name, message = type(exc).__name__, one_line(exc, limit=None)
    return name if message == name else f"{name}: {message}"


def _resolve_factory(spec: str, option: str = "--arch") -> Callable[[], object]:
    """Import ``pkg.module:factory`` (the target may be dotted, e.g. ``Class.create``)."""
    module_name, _, target = spec.partition(":")
    if not module_name or not target:
        raise BnfixError(f"bad {option} {spec!r}: expected pkg.module:factory")
    try:
        obj: object = importlib.import_module(module_name)
    except Exception as exc:
        raise BnfixError(
            f"cannot import {module_name!r} for {option} {spec}: {_one_line(exc)}; "
            "is it installed or on PYTHONPATH?"
        ) from exc
    for part in target.split("."):
        if not hasattr(obj, part):
            raise BnfixError(f"{option} {spec}: {module_name} has no attribute {target!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise BnfixError(f"{option} {spec}: {target!r} is a {type(obj).__name__}, not callable")
    return obj


def _call_factory(spec: str, option: str = "--arch") -> nn.Module:
    factory = _resolve_factory(spec, option)
    try:
        model = factory()
    except Exception as exc:
        raise BnfixError(f"{option} {spec}: calling {spec}() failed: {_one_line(exc)}") from exc
    if not isinstance(model, nn.Module):
        raise BnfixError(
            f"{option} {spec}: {spec}() returned a {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def _create_timm(name: str, option: str = "--arch") -> nn.Module:
    if not name:
        raise BnfixError(f"bad {option} 'timm:': expected timm:NAME, e.g. timm:resnet50")
    if ":" in name or "/" in name:
        # hf-hub:, local-dir: and the like fetch or read configs: bnfix never goes online.
        raise BnfixError(
            f"{option} timm:{name}: only timm's built-in model names are accepted "
            "(no hub or local-dir sources; bnfix never downloads)"
        )
    if importlib.util.find_spec("timm") is None:
        raise BnfixError("timm is not installed: pip install timm")
    import timm

    try:
        return timm.create_model(name, pretrained=False)
    except Exception as exc:
        raise BnfixError(f"{option} timm:{name}: timm cannot create it: {_one_line(exc)}") from exc


def is_builtin(arch: str) -> bool:
    """True for names bnfix builds without importing anyone's code: torchvision's models and,
    when timm is installed, timm's registered ones. A ``pkg.module:factory`` is never built-in:
    building it imports and calls that module."""
    if arch.startswith("timm:"):
        name = arch.removeprefix("timm:")
        if not name or importlib.util.find_spec("timm") is None:
            return False
        import timm

        return name in timm.list_models()
    return ":" not in arch and arch in _torchvision_names()


def _build_module(
    state_dict: Mapping[str, Tensor], model: nn.Module, label: str, option: str = "--arch"
) -> tuple[nn.Module, Recognition]:
    """Fit a checkpoint to a user-supplied module (same tolerance as for torchvision)."""
    layout = _layout_of(model)
    result = _fit(_shapes(state_dict), layout)
    if isinstance(result, _Mismatch):
        raise BnfixError(
            f"{option} {label} does not fit this checkpoint: {result.describe()}; "
            "check that it builds the same architecture"
        )
    notes = _notes(result, layout, label) + _checkpoint_notes(state_dict, layout)
    _adapt(model, result)
    recognition = Recognition(label, result.in_channels, result.num_classes, tuple(notes))
    return load_weights(model, state_dict), recognition


def create_model(arch: str, *, option: str = "--arch") -> nn.Module:
    """A randomly initialised model for ``arch`` (never downloads weights): for training from
    scratch. ``arch`` is a torchvision name, ``"pkg.module:factory"`` or ``"timm:NAME"``.

    ``option`` is how the user named the architecture (``--arch``, a config key), so that an
    error points at the setting to change.
    """
    if arch.startswith("timm:"):
        return _create_timm(arch.removeprefix("timm:"), option)
    if ":" in arch:
        return _call_factory(arch, option)
    names = sorted(_torchvision_names())
    if arch not in names:
        close = difflib.get_close_matches(arch, names, n=1)
        hint = f"; did you mean {close[0]}?" if close else "; or pass pkg.module:factory"
        raise BnfixError(f"{option}: unknown architecture {arch!r}: not a torchvision model{hint}")
    import torchvision

    return torchvision.models.get_model(arch, weights=None)


def build_model(
    state_dict: Mapping[str, Tensor], arch: str | None = None, *, option: str = "--arch"
) -> tuple[nn.Module, Recognition]:
    """Build the checkpoint's model with its weights: on the CPU, in eval mode.

    ``arch`` is None (recognise a torchvision model), a torchvision name (``"resnet50"``),
    ``"pkg.module:factory"`` (a callable returning an ``nn.Module``) or ``"timm:NAME"``.
    The model's parameters and buffers *are* the checkpoint's tensors (bit-exact, no copy):
    clone the state dict first if it must survive training-mode updates of the model.
    ``option`` names the setting the architecture came from, for error messages.
    """
    if arch is None:
        match, closest = _recognise(state_dict)
        if match is None:
            hint = f" (closest torchvision model {closest})" if closest else ""
            raise BnfixError(
                f"cannot recognise the architecture from the checkpoint's {len(state_dict)} "
                f"keys{hint}; pass {option} NAME, {option} pkg.module:factory or "
                f"{option} timm:NAME"
            )
        return _build_match(state_dict, match)
    if arch.startswith("timm:"):
        model = _create_timm(arch.removeprefix("timm:"), option)
        return _build_module(state_dict, model, arch, option)
    if ":" in arch:
        return _build_module(state_dict, _call_factory(arch, option), arch, option)
    return _build_torchvision(state_dict, arch, option)


def stem_in_channels(model: nn.Module) -> int:
    """Input channels of the first ``nn.Conv2d``: what a probe batch must have."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    raise BnfixError("the model has no nn.Conv2d, so its input channels are unknown")
