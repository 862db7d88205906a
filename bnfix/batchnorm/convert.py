"""``convert`` a model's BatchNorms into ABRi blocks (saying what it converted and skipped), and
``fold`` the blocks back into one BatchNorm each, of the layer's own class."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnfix.batchnorm.abri import (
    ABRiBatchNorm,
    Per,
    check_alpha,
    check_per,
    folded_parameters,
)
from bnfix.batchnorm.kinds import is_frozen_batchnorm, refusal, skip_reason
from bnfix.errors import BnfixError


@dataclass
class ConvertReport:
    """What :func:`convert_report` did, layer by layer (module names, in module order)."""

    model: nn.Module
    converted: dict[str, str] = field(default_factory=dict)  # layer → its class name
    kept: list[str] = field(default_factory=list)  # ABRi blocks already, left as they were
    skipped: dict[str, str] = field(default_factory=dict)  # layer → why it was left alone
    #: a converted layer the model also holds under other names (one module in two places):
    #: the same block is set at each of them
    aliases: dict[str, list[str]] = field(default_factory=dict)

    def summary(self) -> str:
        """One line: how many layers were converted, kept and skipped, and why."""
        parts = [f"ABRi: {len(self.converted)} BatchNorm layers converted"]
        kinds: dict[str, int] = {}
        for kind in self.converted.values():
            kinds[kind] = kinds.get(kind, 0) + 1
        if len(kinds) > 1 or (kinds and next(iter(kinds)) != "BatchNorm2d"):
            parts[0] += " (" + ", ".join(f"{n} {k}" for k, n in kinds.items()) + ")"
        if self.aliases:
            shared = ", ".join(f"{k} = {', '.join(v)}" for k, v in list(self.aliases.items())[:3])
            parts.append(f"{len(self.aliases)} shared under several names ({shared})")
        if self.kept:
            parts.append(f"{len(self.kept)} already ABRi blocks, kept")
        if self.skipped:
            parts.append(f"{len(self.skipped)} skipped: {_reasons(self.skipped)}")
        return "; ".join(parts)


def _reasons(skipped: dict[str, str]) -> str:
    by_reason: dict[str, list[str]] = {}
    for name, reason in skipped.items():
        by_reason.setdefault(reason, []).append(name)
    return "; ".join(
        f"{', '.join(names[:3])}{f' and {len(names) - 3} more' if len(names) > 3 else ''} "
        f"({reason})"
        for reason, names in by_reason.items()
    )


def convert_report(
    model: nn.Module, alpha: float = 0.5, per: Per = "layer", only: Iterable[str] | None = None
) -> ConvertReport:
    """Swap every BatchNorm for an ABRi block in place and report layer by layer what happened.

    Every ``_BatchNorm`` kind :mod:`bnfix.batchnorm.kinds` knows is converted (BatchNorm1d/2d/3d,
    SyncBatchNorm, timm's BatchNormAct2d/SyncBatchNormAct, subclasses that keep their forward).
    Layers without affine γ/β or running statistics, and frozen BatchNorms, are skipped, each
    with its reason. A BatchNorm whose forward ABRi does not know raises :class:`BnfixError`
    before anything is changed. ``only`` restricts the swap to the named modules; naming a
    layer that cannot be converted is an error.

    Existing ABRi blocks are left exactly as they are (their inner ``original``/``additional``
    BNs belong to the block), so converting twice is a no-op for them whatever ``alpha`` and
    ``per`` say; naming a block in ``only`` is allowed, naming a BN inside one is refused.
    """
    check_alpha(alpha)
    check_per(per)
    wanted = None if only is None else set(only)
    report = ConvertReport(model)
    found: set[str] = set()
    blocks: set[str] = set()
    todo: list[tuple[str, _BatchNorm]] = []
    names = _names(model)
    for name, module in list(_layers(model)):
        if isinstance(module, ABRiBatchNorm):
            blocks.add(name)
        here = names[id(module)]  # all its names: one BN may sit in two places
        if wanted is not None and not wanted.intersection(here):
            continue
        if isinstance(module, ABRiBatchNorm):
            found.update(here)
            report.kept.append(name)
            continue
        if not (isinstance(module, _BatchNorm) or is_frozen_batchnorm(module)):
            continue
        found.update(here)
        reason = skip_reason(module)
        if reason is not None:
            if wanted is not None:
                raise BnfixError(f"ABRi cannot convert {name}: {reason}")
            report.skipped[name] = reason
            continue
        if (refused := refusal(name, module)) is not None:
            raise BnfixError(refused)
        todo.append((name, module))
    if wanted is not None and (missing := sorted(wanted - found)):
        inner = [n for n in missing if any(n.startswith(f"{b}.") for b in blocks)]
        if inner:
            raise BnfixError(
                f"{', '.join(inner)} is inside an ABRi block; name the block itself in only=..."
            )
        raise BnfixError(f"no BatchNorm named {', '.join(missing)} in the model")
    for name, module in todo:
        block = ABRiBatchNorm.from_batchnorm(module, alpha, per)
        for place in names[id(module)]:  # a shared BN stays shared, as one block
            _set_submodule(model, place, block)
        report.converted[name] = type(module).__name__
        if len(names[id(module)]) > 1:
            report.aliases[name] = names[id(module)][1:]
    return report


def convert(
    model: nn.Module, alpha: float = 0.5, per: Per = "layer", only: Iterable[str] | None = None
) -> nn.Module:
    """:func:`convert_report`, returning ``model``; skipped layers are named in a warning.

    Use :func:`convert_report` to get the layer-by-layer account as a value.
    """
    report = convert_report(model, alpha, per, only)
    if report.skipped:
        warnings.warn(
            f"ABRi left {len(report.skipped)} normalisation layers as they were: "
            f"{_reasons(report.skipped)}",
            UserWarning,
            stacklevel=2,
        )
    return model


def _layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``model.named_modules()`` without descending into ABRi blocks or BatchNorms (whose
    children, timm's ``drop``/``act``, belong to them), each shared module once."""
    seen: set[int] = set()
    stack = [("", model)]
    while stack:
        name, module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        yield name, module
        if not isinstance(module, (ABRiBatchNorm, _BatchNorm)):
            children = [(f"{name}.{k}" if name else k, m) for k, m in module.named_children()]
            stack.extend(reversed(children))


def _names(model: nn.Module) -> dict[int, list[str]]:
    """Every name of each module, in module order: one BatchNorm can sit in two places
    (``self.bn2 = self.bn``, or an attribute and a ModuleList entry), and a swap at one of
    them would leave the other running the old module."""
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    return names


def fold(model: nn.Module) -> nn.Module:
    """Replace every ABRi block by the one BatchNorm it equals in eval mode, in place.

    The BatchNorm is of the pretrained layer's own class, with everything it carries (timm's
    ``act`` and ``drop``, a SyncBatchNorm's process group), so the folded model is the stock
    architecture again. Folding is computed in float64 and stored in the block's dtype; each
    new module keeps the block's train/eval mode, device and dtype, and the pretrained BN's
    eps, momentum and batch count.
    """
    if isinstance(model, ABRiBatchNorm):
        return fold_block(model)
    folded: dict[int, _BatchNorm] = {}  # a shared block folds once, into one shared BN
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if isinstance(module, ABRiBatchNorm):
            bn = folded.setdefault(id(module), fold_block(module))
            _set_submodule(model, name, bn)
    return model


def fold_block(block: ABRiBatchNorm) -> _BatchNorm:
    """A copy of ``block.original`` (its class, children and settings) holding the folded map."""
    pre = block.original
    own = [*pre.parameters(recurse=False), *pre.buffers(recurse=False)]
    memo: dict[int, object] = {id(t): t for t in own}  # replaced below, never copied
    group = getattr(pre, "process_group", None)
    if group is not None:
        memo[id(group)] = group  # a process group is shared, not copied
    bn = copy.deepcopy(pre, memo)
    with torch.no_grad():
        weight, bias, mean, var = folded_parameters(block, torch.float64)
        dtype = pre.weight.dtype
        bn.weight = nn.Parameter(weight.to(dtype), requires_grad=pre.weight.requires_grad)
        bn.bias = nn.Parameter(bias.to(dtype), requires_grad=pre.bias.requires_grad)
        bn.running_mean = mean.to(pre.running_mean.dtype)
        bn.running_var = var.to(pre.running_var.dtype)
        if pre.num_batches_tracked is not None:
            bn.num_batches_tracked = pre.num_batches_tracked.clone()
    bn.train(block.training)
    return bn


def abri_blocks(model: nn.Module) -> dict[str, ABRiBatchNorm]:
    """The ABRi blocks by name, every name of a shared one."""
    return {
        n: m for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, ABRiBatchNorm)
    }


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    if not name:
        raise BnfixError("convert/fold act on the modules inside a model, not on a bare BatchNorm")
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)
