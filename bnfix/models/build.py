"""Building a model for a checkpoint: recognised, named (torchvision, ``timm:NAME``) or from a
user's ``pkg.module:factory``, with the checkpoint's own tensors loaded strictly.

Zoo models are constructed on the meta device, given the checkpoint's stem width and
classifier, and then receive the checkpoint's tensors by ``load_state_dict(assign=True)``: no
random initialisation, no copy.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
from collections import OrderedDict
from collections.abc import Callable, Mapping
from itertools import chain

import torch
from torch import Tensor, nn

from bnfix.errors import BnfixError, one_line
from bnfix.models import timm_zoo, torchvision_zoo
from bnfix.models.families import Match, Variant, fit_variant
from bnfix.models.layouts import (
    CONVOLUTIONS,
    Fit,
    Mismatch,
    Recognition,
    canonical_keys,
    checkpoint_notes,
    fit,
    is_batch_counter,
    layout_of,
    notes,
    shapes_of,
)
from bnfix.models.recognition import find

__all__ = ["build_model", "create_model", "is_builtin", "load_weights"]


def _adapt(model: nn.Module, result: Fit) -> None:
    """Give the model the checkpoint's stem width and classifier, with placeholder tensors.

    The stem and head are changed in place (only their sizes and weights), so subclasses of
    the convolutions and ``nn.Linear`` keep their behaviour; ``load_state_dict(assign=True)``
    then puts the checkpoint's tensors in the placeholders' places.
    """
    layout = result.layout
    if result.stem_changed and layout.stem is not None:
        conv = model.get_submodule(layout.stem)
        conv.in_channels = result.in_channels
        shape = (conv.out_channels, result.in_channels, *conv.kernel_size)
        conv.weight = nn.Parameter(torch.empty(shape, device="meta"))
    if result.head_missing and layout.head is not None:
        model.set_submodule(layout.head, nn.Identity())
    elif result.head_resized and layout.head is not None and result.num_classes is not None:
        head = model.get_submodule(layout.head)
        shape = (result.num_classes, *head.weight.shape[1:])
        if isinstance(head, nn.Linear):
            head.out_features = result.num_classes
        elif isinstance(head, CONVOLUTIONS):
            head.out_channels = result.num_classes
        head.weight = nn.Parameter(torch.empty(shape, device="meta"))
        if getattr(head, "bias", None) is not None:
            head.bias = nn.Parameter(torch.empty((result.num_classes,), device="meta"))


def load_weights(model: nn.Module, state_dict: Mapping[str, Tensor]) -> nn.Module:
    """Put the checkpoint's own tensors into the model (no copy), ready to run on the CPU.

    Batch counters the checkpoint lacks become 0 and ones the model lacks are dropped, so old
    checkpoints load strictly. No meta tensor may survive: that would be a bug here.
    """
    wanted = model.state_dict()
    tensors = OrderedDict(
        (k, v) for k, v in state_dict.items() if k in wanted or not is_batch_counter(k)
    )
    # Module versions (MNASNet refuses to load without one): the layout matched the model's.
    tensors._metadata = wanted._metadata  # type: ignore[attr-defined]
    for key in wanted:
        if is_batch_counter(key) and key not in tensors:
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


def _build_match(state_dict: Mapping[str, Tensor], match: Match) -> tuple[nn.Module, Recognition]:
    model = match.build()
    _adapt(model, match.fit)
    canonical, _ = canonical_keys(state_dict)
    return load_weights(model, canonical), match.recognition


def _build_variants(
    state_dict: Mapping[str, Tensor], label: str, variants: list[Variant], option: str
) -> tuple[nn.Module, Recognition]:
    """Build the first variant that fits, or say precisely why the closest does not."""
    canonical, renamed = canonical_keys(state_dict)
    mismatches = []
    for variant in variants:
        result = fit_variant(canonical, variant, renamed)
        if isinstance(result, Match):
            return _build_match(state_dict, result)
        mismatches.append(result)
    closest = min(mismatches, key=lambda m: m.size)
    raise BnfixError(
        f"{option} {label} does not fit this checkpoint: {closest.describe()}; "
        f"check the architecture or pass {option} pkg.module:factory"
    )


def _build_torchvision(
    state_dict: Mapping[str, Tensor], name: str, option: str = "--arch"
) -> tuple[nn.Module, Recognition]:
    if name not in torchvision_zoo.names():
        raise BnfixError(
            f"{option}: unknown architecture {name!r}: pass a torchvision model name "
            "(e.g. resnet50), pkg.module:factory or timm:NAME"
        )
    return _build_variants(state_dict, name, torchvision_zoo.variants_named(name), option)


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


def _check_timm_name(name: str, option: str) -> None:
    if not name:
        raise BnfixError(f"bad {option} 'timm:': expected timm:NAME, e.g. timm:resnet50")
    if ":" in name or "/" in name:
        # hf-hub:, local-dir: and the like fetch or read configs: bnfix never goes online.
        raise BnfixError(
            f"{option} timm:{name}: only timm's built-in model names are accepted "
            "(no hub or local-dir sources; bnfix never downloads)"
        )
    if not timm_zoo.available():
        raise BnfixError("timm is not installed: pip install timm")


def _create_timm(name: str, option: str = "--arch") -> nn.Module:
    _check_timm_name(name, option)
    import timm

    try:
        return timm.create_model(name, pretrained=False)
    except Exception as exc:
        raise BnfixError(f"{option} timm:{name}: timm cannot create it: {_one_line(exc)}") from exc


def _build_timm(
    state_dict: Mapping[str, Tensor], name: str, option: str
) -> tuple[nn.Module, Recognition]:
    """A named timm model, constructed on the meta device like torchvision's."""
    _check_timm_name(name, option)
    variant = Variant(name, 0, zoo=timm_zoo.ZOO)
    try:
        timm_zoo.timm_layout(name)
    except Exception:
        # Not constructible on the meta device (or not at all): build it for real, which
        # also gives timm's own error message for a name it does not know.
        return _build_module(state_dict, _create_timm(name, option), variant.label, option)
    return _build_variants(state_dict, variant.label, [variant], option)


def is_builtin(arch: str) -> bool:
    """True for names bnfix builds without importing anyone's code: torchvision's models
    (2-D and video) and, when timm is installed, timm's registered ones. A
    ``pkg.module:factory`` is never built-in: building it imports and calls that module."""
    if arch.startswith("timm:"):
        name = arch.removeprefix("timm:")
        return bool(name) and timm_zoo.available() and name in timm_zoo.registered()
    return ":" not in arch and arch in torchvision_zoo.names()


def _build_module(
    state_dict: Mapping[str, Tensor], model: nn.Module, label: str, option: str = "--arch"
) -> tuple[nn.Module, Recognition]:
    """Fit a checkpoint to a user-supplied module (same tolerance as for torchvision)."""
    layout = layout_of(model)
    result = fit(shapes_of(state_dict), layout)
    restored = _restore_outer_name(state_dict, model) if isinstance(result, Mismatch) else None
    if restored is not None:  # loading stripped it as a wrapper's: this model's own name
        state_dict, (outer, again) = restored
        if not isinstance(again, Mismatch):
            result = again
    if isinstance(result, Mismatch):
        raise BnfixError(
            f"{option} {label} does not fit this checkpoint: {result.describe()}; "
            "check that it builds the same architecture"
        )
    said = notes(result, layout, label) + checkpoint_notes(state_dict, layout)
    if restored is not None and result is again:
        said.append(f"kept the prefix '{outer}.': {label} names its own module so")
    _adapt(model, result)
    recognition = Recognition(label, result.in_channels, result.num_classes, tuple(said))
    return load_weights(model, state_dict), recognition


def _restore_outer_name(
    state_dict: Mapping[str, Tensor], model: nn.Module
) -> tuple[dict[str, Tensor], tuple[str, Fit | Mismatch]] | None:
    """The checkpoint with the model's one top-level module name put back on every key, and
    how that fits, when every model key carries it and no checkpoint key does: a factory
    whose whole network sits in ``self.encoder`` (or ``backbone``, ``net``, ``model``) saves
    keys that loading strips as a wrapper's prefix."""
    names = {k.split(".", 1)[0] for k in model.state_dict()}
    if len(names) != 1:
        return None
    outer = names.pop()
    if any(k.startswith(f"{outer}.") for k in state_dict):
        return None
    prefixed = {f"{outer}.{k}": v for k, v in state_dict.items()}
    return prefixed, (outer, fit(shapes_of(prefixed), layout_of(model)))


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
    names = sorted(torchvision_zoo.names())
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

    ``arch`` is None (recognise a torchvision or timm model), a torchvision name
    (``"resnet50"``, ``"r2plus1d_18"``), ``"timm:NAME"`` or ``"pkg.module:factory"`` (a
    callable returning an ``nn.Module``). The model's parameters and buffers *are* the
    checkpoint's tensors (bit-exact, no copy): clone the state dict first if it must survive
    training-mode updates of the model. ``option`` names the setting the architecture came
    from, for error messages.
    """
    if arch is None:
        match, closest = find(state_dict)
        if match is None:
            hint = f" (closest model {closest})" if closest else ""
            raise BnfixError(
                f"cannot recognise the architecture from the checkpoint's {len(state_dict)} "
                f"keys{hint}; pass {option} NAME, {option} pkg.module:factory or "
                f"{option} timm:NAME"
            )
        return _build_match(state_dict, match)
    if arch.startswith("timm:"):
        return _build_timm(state_dict, arch.removeprefix("timm:"), option)
    if ":" in arch:
        return _build_module(state_dict, _call_factory(arch, option), arch, option)
    return _build_torchvision(state_dict, arch, option)
