"""ABRi in state-dict keys: recognising repaired checkpoints, viewing them as plain ones, and
reading the official ABRi ResNet's layout.

bnfix writes an ABRi block at module path ``P`` as ``P.original.*``, ``P.additional.*`` and
``P.alpha``. The paper's released ResNet instead keeps ``bn1`` next to ``bn1_addition`` and a
``fusion_weight1`` in the parent, and wraps the shortcut as ``downsample.conv``/``downsample.bn``;
:func:`from_official` renames that layout into ours so everything downstream sees one format.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor

ORIGINAL, ADDITIONAL, ALPHA = "original", "additional", "alpha"

_OFFICIAL_ADDITION = re.compile(r"^(?P<mod>(?:.*\.)?)(?P<bn>bn\d*)_addition\.(?P<leaf>\w+)$")
_OFFICIAL_FUSION = re.compile(r"^(?P<mod>(?:.*\.)?)fusion_weight(?P<num>\d*)$")


def abri_prefixes(state: Mapping[str, Tensor]) -> list[str]:
    """Module paths of the ABRi blocks in ``state``, in key order."""
    keys = set(state)
    found = []
    for key in state:
        prefix, _, leaf = key.rpartition(".")
        if leaf == ALPHA and f"{prefix}.{ORIGINAL}.weight" in keys:
            found.append(prefix)
    return found


def is_abri(state: Mapping[str, Tensor]) -> bool:
    return bool(abri_prefixes(state))


def plain_view(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The checkpoint as its architecture had it before repair: each block's pretrained BN.

    Used to recognise and build the model; the twins and α are added back by ``convert``.
    Everything under ``P.original.`` comes back under ``P.``, including what a BN kind carries
    below its own tensors (timm's ``BatchNormAct2d`` with a parametrised ``act``:
    ``P.original.act.weight`` → ``P.act.weight``).
    """
    blocks = set(abri_prefixes(state))
    if not blocks:
        return dict(state)
    plain = {}
    for key, tensor in state.items():
        block, part, rest = _split_under(key, blocks)
        if block is None:
            plain[key] = tensor
        elif part == ORIGINAL:
            plain[f"{block}.{rest}"] = tensor
        # else: the twin and α
    return plain


def _split_under(key: str, blocks: set[str]) -> tuple[str | None, str | None, str]:
    """``a.b.original.act.weight`` with block ``a.b`` → ``("a.b", "original", "act.weight")``."""
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        block = ".".join(parts[:i])
        if block in blocks:
            rest = parts[i:]
            if rest == [ALPHA]:
                return block, ALPHA, ALPHA
            if len(rest) >= 2 and rest[0] in (ORIGINAL, ADDITIONAL):
                return block, rest[0], ".".join(rest[1:])
    return None, None, key


def from_official(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], bool]:
    """Rename the official ABRi ResNet's keys into bnfix's layout; ``(state, False)`` if not it."""
    additions = {m["mod"] + m["bn"] for k in state if (m := _OFFICIAL_ADDITION.match(k))}
    if not additions:
        return dict(state), False
    renamed = {}
    for key, tensor in state.items():
        new_key, value = _official_key(key, tensor, additions)
        renamed[_torchvision_shortcut(new_key)] = value
    return renamed, True


def _official_key(key: str, tensor: Tensor, additions: set[str]) -> tuple[str, Tensor]:
    if m := _OFFICIAL_ADDITION.match(key):
        return f"{m['mod']}{m['bn']}.{ADDITIONAL}.{m['leaf']}", tensor
    if m := _OFFICIAL_FUSION.match(key):
        # fusion_weight1 belongs to bn1; a bare fusion_weight to the module's only BN (the
        # stem's bn1, or the shortcut's bn).
        names = [f"bn{m['num']}"] if m["num"] else ["bn", "bn1"]
        owner = next((m["mod"] + n for n in names if m["mod"] + n in additions), None)
        if owner is not None:
            return f"{owner}.{ALPHA}", tensor.reshape(-1)
        return key, tensor
    prefix, _, leaf = key.rpartition(".")
    if prefix in additions:
        return f"{prefix}.{ORIGINAL}.{leaf}", tensor
    return key, tensor


def _torchvision_shortcut(key: str) -> str:
    """``downsample.conv``/``downsample.bn`` → torchvision's ``downsample.0``/``downsample.1``."""
    return key.replace(".downsample.conv.", ".downsample.0.").replace(
        ".downsample.bn.", ".downsample.1."
    )
