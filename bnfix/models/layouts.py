"""What a model's state dict looks like, and whether a checkpoint fits it.

Shared by every zoo (torchvision, timm, a user's factory): a *layout* is a model's keys and
shapes plus where its stem (the first convolution, of any dimension) and classifier (the last
``nn.Linear``, or a final 1×…×1 convolution as in S3D) are. A checkpoint *fits* a layout when
its keys and shapes are the same, tolerating the two changes cross-modal re-use makes: a stem
with another number of input channels and a classifier that is missing or has another number
of outputs. Models are read on the meta device (:func:`empty_weights`), so nothing is allocated.
"""

from __future__ import annotations

import gc
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

from torch import Tensor, nn

__all__ = [
    "CONVOLUTIONS",
    "Fit",
    "Kwargs",
    "Layout",
    "Mismatch",
    "Recognition",
    "Shape",
    "canonical_keys",
    "checkpoint_notes",
    "empty_weights",
    "fit",
    "gc_paused",
    "is_batch_counter",
    "layout_of",
    "notes",
    "pattern",
    "shapes_of",
]

Shape = tuple[int, ...]
Kwargs = tuple[tuple[str, object], ...]

BATCH_COUNTER = "num_batches_tracked"
# The stem is the first of these (timm's Conv2dSame, StdConv2d... are subclasses).
CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# torchvision's own remapping of pre-0.3 DenseNet keys ("denselayer1.norm.1.weight").
_LEGACY_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


@dataclass(frozen=True)
class Recognition:
    """What a checkpoint is, and how it differs from the stock model."""

    name: str  # e.g. "resnet18", "r2plus1d_18", "timm:resnet50d", "pkg.mod:factory"
    in_channels: int  # the checkpoint's stem input channels (0 when the model has no conv)
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
        # A non-persistent buffer is not in any state dict, so loading would never fill it
        # (timm's BlurPool filter in densenetblur121d was left on meta): it keeps the value
        # its module computed, small by nature (a filter, an index table).
        if tensor is not None and persistent:
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


@contextmanager
def gc_paused() -> Iterator[None]:
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


# --------------------------------------------------------------------------------------------
# Layouts


def is_batch_counter(key: str) -> bool:
    """``num_batches_tracked`` is absent from old checkpoints, so matching ignores it."""
    return key == BATCH_COUNTER or key.endswith("." + BATCH_COUNTER)


def pattern(key: str) -> str:
    """A key with its numbers blanked: the same for every depth and width of a family."""
    return re.sub(r"\d+", "#", key)


def shapes_of(state_dict: Mapping[str, Tensor]) -> dict[str, Shape]:
    """Keys and shapes, batch counters aside (only shapes are read: meta tensors work)."""
    return {k: tuple(v.shape) for k, v in state_dict.items() if not is_batch_counter(k)}


@dataclass(frozen=True)
class Layout:
    """Keys and shapes of a model (batch counters aside), plus where its stem and head are."""

    shapes: Mapping[str, Shape]
    batch_counters: frozenset[str]
    stem: str | None  # module path of the first convolution (1-, 2- or 3-D)
    stem_in: int
    stem_groups: int
    head: str | None  # module path of the classifier
    head_out: int | None
    head_bias: bool
    patterns: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "patterns", frozenset(pattern(k) for k in self.shapes))

    @property
    def stem_key(self) -> str | None:
        return None if self.stem is None else f"{self.stem}.weight"

    @property
    def head_keys(self) -> tuple[str, ...]:
        if self.head is None:
            return ()
        bias = (f"{self.head}.bias",) if self.head_bias else ()
        return (f"{self.head}.weight", *bias)


def _is_pointwise_conv(module: nn.Module) -> bool:
    return isinstance(module, CONVOLUTIONS) and all(k == 1 for k in module.kernel_size)


def layout_of(model: nn.Module) -> Layout:
    """Read a (possibly meta) model's layout.

    The classifier is the last ``nn.Linear``; a model without one whose last weighted module
    is a 1×…×1 convolution (torchvision's S3D) has that as its classifier.
    """
    state = model.state_dict()
    modules = [(n, m) for n, m in model.named_modules() if f"{n}.weight" in state]
    convs = [(n, m) for n, m in modules if isinstance(m, CONVOLUTIONS) and not m.transposed]
    linears = [(n, m) for n, m in modules if isinstance(m, nn.Linear)]
    stem_name, stem = convs[0] if convs else (None, None)
    head_name: str | None = None
    head: nn.Module | None = None
    head_out: int | None = None
    if linears:
        head_name, head = linears[-1]
        head_out = head.out_features
    elif len(convs) > 1 and modules[-1][0] == convs[-1][0] and _is_pointwise_conv(convs[-1][1]):
        head_name, head = convs[-1]
        head_out = head.out_channels
    return Layout(
        shapes=shapes_of(state),
        batch_counters=frozenset(k for k in state if is_batch_counter(k)),
        stem=stem_name,
        stem_in=stem.in_channels if stem is not None else 0,
        stem_groups=stem.groups if stem is not None else 1,
        head=head_name,
        head_out=head_out,
        head_bias=head is not None and getattr(head, "bias", None) is not None,
    )


# --------------------------------------------------------------------------------------------
# Fitting a checkpoint to a layout


@dataclass(frozen=True)
class Fit:
    """A checkpoint fits a layout, possibly with another stem width or classifier size."""

    layout: Layout
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
class Mismatch:
    """Why a checkpoint does not fit a layout, for the error message."""

    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    misshaped: tuple[tuple[str, Shape, Shape], ...]  # key, checkpoint shape, model shape

    @property
    def size(self) -> int:
        return len(self.missing) + len(self.unexpected) + len(self.misshaped)

    def describe(self) -> str:
        """One line: the three counts, each with up to two examples (the first differing
        shape first)."""

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


def _stem_fits(got: Shape, want: Shape, layout: Layout) -> bool:
    """Only the input-channel dimension of an ungrouped stem may differ."""
    return (
        layout.stem_groups == 1
        and len(got) == len(want) >= 3
        and got[0] == want[0]
        and got[2:] == want[2:]
    )


def checkpoint_classes(shapes: Mapping[str, Shape], layout: Layout) -> int | None:
    """The classifier size the checkpoint has, when its head has the model's input size."""
    if layout.head is None:
        return None
    got = shapes.get(f"{layout.head}.weight")
    want = layout.shapes[f"{layout.head}.weight"]
    if got is None or len(got) != len(want) or got[1:] != want[1:]:
        return None
    return got[0]


def fit(shapes: Mapping[str, Shape], layout: Layout) -> Fit | Mismatch:
    """Compare a checkpoint's shapes (batch counters removed) with a model's layout."""
    head_keys = layout.head_keys
    missing = [k for k in layout.shapes if k not in shapes]
    head_missing = bool(head_keys) and all(k in missing for k in head_keys)
    if head_missing:
        missing = [k for k in missing if k not in head_keys]
    unexpected = [k for k in shapes if k not in layout.shapes]
    in_channels = layout.stem_in
    num_classes = None if head_missing else checkpoint_classes(shapes, layout)
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
        return Mismatch(tuple(missing), tuple(unexpected), tuple(misshaped))
    return Fit(layout, in_channels, num_classes)


def _head_shape(key: str, layout: Layout, num_classes: int | None) -> Shape | None:
    """The shape a head tensor must have for ``num_classes`` outputs."""
    want = layout.shapes[key]
    if num_classes is None:
        return None
    return (num_classes, *want[1:])


def notes(result: Fit, default: Layout, origin: str) -> list[str]:
    """Say how the checkpoint differs from the stock model (``default``)."""
    said = []
    if result.in_channels != default.stem_in:
        said.append(f"{result.in_channels}-channel stem ({origin} has {default.stem_in})")
    if result.head_missing:
        said.append(f"no classifier ({result.layout.head}.* absent)")
    elif result.num_classes != default.head_out:
        said.append(f"classifier has {result.num_classes} outputs ({origin}: {default.head_out})")
    return said


def checkpoint_notes(state_dict: Mapping[str, Tensor], layout: Layout) -> list[str]:
    """Remarks about the tensors themselves: missing batch counters, non-float32 weights."""
    said = []
    if layout.batch_counters and not any(is_batch_counter(k) for k in state_dict):
        said.append(f"no {BATCH_COUNTER} (older checkpoint); set to 0 when loading")
    dtypes = {
        str(v.dtype).removeprefix("torch.") for v in state_dict.values() if v.is_floating_point()
    }
    if dtypes - {"float32"}:
        said.append(f"weights stored as {', '.join(sorted(dtypes))} (not float32)")
    return said


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
