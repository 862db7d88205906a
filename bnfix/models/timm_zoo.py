"""Where timm models are recognised (when timm is installed): its families that use BatchNorm.

timm registers well over a thousand models, far too many to build for every checkpoint. The
catalogue (:mod:`bnfix.models.timm_catalogue`, written for one timm version by
``python -m bnfix.models.update_timm_catalogue``) lists, per timm family (its module:
``efficientnet``, ``resnet``, ...), the members that have BatchNorm with their key counts,
the key patterns of the whole family, and a *signature* per member: a hash of its keys and
shapes with the stem's input channels and the classifier left out, the two things
cross-modal re-use changes. Recognition hashes the checkpoint the same way and builds only the
member(s) whose signature it has, on the meta device, to fit it exactly; a cold recognition
builds one timm model.

With another timm version than the catalogue's, signatures are not trusted: families are
prefiltered by the key patterns of their representatives (built then, once) and members tried
nearest key count first, as for torchvision: slower, never wrong. Models added to timm since
the catalogue was written are not recognised until it is rewritten; ``--arch timm:NAME``
always works. ``python -m bnfix.models.update_timm_catalogue --check`` says whether the
catalogue is current for the installed timm and torchvision (it builds every model: minutes).

The catalogue also records which timm members have a torchvision model's keys and shapes
(``TORCHVISION_TWINS``): for any other signature hit no torchvision model can fit, so the
torchvision search is skipped (torchvision's name still wins whenever one fits).

Members with exactly the same keys and shapes (``efficientnet_b0`` and ``tf_efficientnet_b0``,
which differs in padding) cannot be told apart from a state dict: the catalogue keeps the usual
name and the recognition names the look-alikes in a note.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

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
)
from bnfix.models.layouts import Fit, Kwargs, Layout, Shape, empty_weights, layout_of, shapes_of

ZOO = "timm"
PREFIX = "timm:"

# timm modules whose models use BatchNorm, likeliest first. Each is one family.
FAMILY_MODULES = (
    "resnet",
    "efficientnet",
    "mobilenetv3",
    "regnet",
    "cspnet",
    "densenet",
    "sknet",
    "res2net",
    "resnest",
    "rexnet",
    "ghostnet",
    "dla",
    "dpn",
    "vovnet",
    "hrnet",
    "byobnet",
    "inception_v3",
    "xception",
)
# Near-miss hints build at most this many members of each family that nearly covers.
_HINT_BUILDS = 2


def available() -> bool:
    return importlib.util.find_spec("timm") is not None


@cache
def registered() -> frozenset[str]:
    """Every model name the installed timm registers (no pretrained tags)."""
    import timm

    return frozenset(timm.list_models())


def construct(name: str, kwargs: Kwargs) -> nn.Module:
    """Build a timm model with meta weights; ``pretrained=False`` always (nothing downloads)."""
    import timm

    with warnings.catch_warnings(), empty_weights():
        warnings.simplefilter("ignore")
        return timm.create_model(name, pretrained=False, **dict(kwargs))


def signature(shapes: Mapping[str, Shape], stem_key: str | None, head_keys: Iterable[str]) -> str:
    """A hash of keys and shapes, without the stem's input channels and the classifier."""
    head = set(head_keys)
    lines = []
    for key, shape in shapes.items():
        if key in head:
            continue
        if key == stem_key and len(shape) >= 3:
            shape = (shape[0], -1, *shape[2:])
        lines.append(f"{key}:{','.join(map(str, shape))}")
    return hashlib.sha1("\n".join(sorted(lines)).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# The catalogue


@dataclass(frozen=True)
class _Member:
    name: str
    keys: int
    signature: str
    stem_key: str | None
    head_keys: tuple[str, ...]
    same_layout: tuple[str, ...]  # look-alikes: the same keys and shapes


@dataclass(frozen=True)
class _Family:
    name: str
    members: tuple[_Member, ...]
    representatives: tuple[str, ...]
    patterns: frozenset[str]

    def variants(self, names: frozenset[str]) -> tuple[Variant, ...]:
        return tuple(Variant(m.name, m.keys, zoo=ZOO) for m in self.members if m.name in names)


@cache
def catalogue() -> tuple[str, tuple[_Family, ...]]:
    """The timm version the catalogue was written for, and its families."""
    from bnfix.models import timm_catalogue as data

    families = []
    for family, entry in data.FAMILIES.items():
        same = entry["same_layout"]
        members = tuple(
            _Member(
                name,
                keys,
                sig,
                None if stem is None else f"{stem}.weight",
                () if head is None else (f"{head}.weight", *((f"{head}.bias",) if bias else ())),
                tuple(same.get(name, ())),
            )
            for name, keys, sig, stem, head, bias in entry["members"]
        )
        families.append(
            _Family(family, members, tuple(entry["representatives"]), frozenset(entry["patterns"]))
        )
    return data.TIMM_VERSION, tuple(families)


def is_current() -> bool:
    """Whether the catalogue was written for the installed timm (then signatures are trusted)."""
    import timm

    return catalogue()[0] == timm.__version__


@cache
def _members_by_name() -> dict[str, _Member]:
    return {m.name: m for f in catalogue()[1] for m in f.members}


@cache
def _signature_index() -> dict[tuple[str | None, tuple[str, ...]], dict[str, list[str]]]:
    """{(stem key, head keys): {signature: member names}}, in catalogue order."""
    index: dict[tuple[str | None, tuple[str, ...]], dict[str, list[str]]] = {}
    for family in catalogue()[1]:
        for m in family.members:
            index.setdefault((m.stem_key, m.head_keys), {}).setdefault(m.signature, []).append(
                m.name
            )
    return index


def _variant_notes(variant: Variant, _fit: Fit, _renamed: bool) -> list[str]:
    member = _members_by_name().get(variant.name)
    if member is None or not member.same_layout:
        return []
    others = ", ".join(PREFIX + n for n in member.same_layout[:3])
    more = f" and {len(member.same_layout) - 3} more" if len(member.same_layout) > 3 else ""
    return [
        f"{others}{more} have the same keys and shapes (they differ in code, e.g. padding): "
        f"pass --arch with the right one if the checkpoint is one of them"
    ]


register(Zoo(ZOO, PREFIX, construct, _variant_notes))


def timm_layout(name: str, kwargs: Kwargs = ()) -> Layout:
    return layout(Variant(name, 0, kwargs, zoo=ZOO))


# --------------------------------------------------------------------------------------------
# Recognition


def search(
    canonical: Mapping[str, Tensor],
    patterns: set[str],
    renamed: bool,
    closest: list[tuple[int, str]],
) -> Match | None:
    """The timm member that fits, or None (``closest`` gains near misses for the hint)."""
    if not available():
        return None
    if is_current():
        return _search_by_signature(canonical, patterns, renamed, closest)
    return _search_by_family(canonical, patterns, renamed, closest)


def signature_hits(canonical: Mapping[str, Tensor]) -> list[Variant]:
    """Members whose signature the checkpoint has (a current catalogue only; else [])."""
    if not available() or not is_current():
        return []
    shapes = shapes_of(canonical)
    names = registered()
    found = []
    for (stem_key, head_keys), signatures in _signature_index().items():
        if stem_key is not None and stem_key not in shapes:
            continue
        for name in signatures.get(signature(shapes, stem_key, head_keys), []):
            if name in names:
                found.append(Variant(name, _members_by_name()[name].keys, zoo=ZOO))
    return found


def torchvision_may_fit(hits: list[Variant]) -> bool:
    """Whether a torchvision model may fit a checkpoint with these signature hits: False only
    when every hit is a timm member no torchvision model shares keys with, as recorded by a
    catalogue written for the installed torchvision too. Then the torchvision search, which
    would build every member of a family whose patterns look alike (timm's resnet26 against
    torchvision's ten ResNets), is skipped."""
    import torchvision

    from bnfix.models import timm_catalogue as data

    if not hits or getattr(data, "TORCHVISION_VERSION", None) != torchvision.__version__:
        return True
    twins = data.TORCHVISION_TWINS
    return any(hit.name in twins for hit in hits)


def _search_by_signature(
    canonical: Mapping[str, Tensor],
    patterns: set[str],
    renamed: bool,
    closest: list[tuple[int, str]],
) -> Match | None:
    match = try_members(canonical, signature_hits(canonical), renamed, closest)
    if match is not None:
        return match
    # No member has these keys and shapes: name the nearest members of families that nearly
    # cover the checkpoint, for the error message (a few builds, on the slow path only).
    shapes = shapes_of(canonical)
    for family in catalogue()[1]:
        if coverage(patterns, family.patterns) >= MIN_FAMILY_COVERAGE:
            nearest = by_key_count(family.variants(registered()), len(shapes))[:_HINT_BUILDS]
            try_members(canonical, nearest, renamed, closest)
    return None


@cache
def _representative_patterns(family: _Family) -> frozenset[str]:
    """Key patterns of the family's representatives as the installed timm builds them."""
    covered: set[str] = set()
    for name in family.representatives:
        if name in registered():
            try:
                covered |= timm_layout(name).patterns
            except Exception:  # a representative this timm can no longer build
                continue
    return frozenset(covered)


def _search_by_family(
    canonical: Mapping[str, Tensor],
    patterns: set[str],
    renamed: bool,
    closest: list[tuple[int, str]],
) -> Match | None:
    """For another timm version: the torchvision scheme (representatives, then key counts)."""
    keys = len(shapes_of(canonical))
    names = registered()
    partial = []
    for family in catalogue()[1]:
        covers = coverage(patterns, _representative_patterns(family))
        if covers == 1.0:
            members = by_key_count(family.variants(names), keys)
            match = try_members(canonical, members, renamed, closest)
            if match is not None:
                return match
        elif covers >= MIN_FAMILY_COVERAGE:
            partial.append(family)
    for family in partial:
        match = try_members(canonical, by_key_count(family.variants(names), keys), renamed, closest)
        if match is not None:
            return match
    return None


# --------------------------------------------------------------------------------------------
# Writing the catalogue


def _uses_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _preference(name: str) -> tuple[int, int, str]:
    """Among look-alikes, the usual name first: no ``tf_``/``gc_``-style prefix, shortest."""
    prefixed = name.startswith(("tf_", "gc_", "legacy_"))
    return (int(prefixed), len(name), name)


def _cover(layouts: dict[str, Layout]) -> list[str]:
    """A few members whose key patterns together cover the family's (greedy set cover)."""
    todo = set().union(*(lay.patterns for lay in layouts.values()))
    chosen = []
    while todo:
        best = max(layouts, key=lambda n: (len(layouts[n].patterns & todo), -len(n)))
        chosen.append(best)
        todo -= layouts[best].patterns
    return chosen


def survey() -> dict[str, dict[str, Any]]:
    """Build every BatchNorm model of ``FAMILY_MODULES`` on the meta device: the catalogue."""
    import timm

    families: dict[str, dict[str, Any]] = {}
    for module in FAMILY_MODULES:
        layouts: dict[str, Layout] = {}
        for name in sorted(timm.list_models(module=module), key=_preference):
            if name.startswith("test_"):
                continue
            try:
                model = construct(name, ())
            except Exception as exc:
                print(f"skipped {name}: {type(exc).__name__}", file=sys.stderr)
                continue
            if _uses_batchnorm(model):
                layouts[name] = layout_of(model)
            del model
        kept: dict[str, Layout] = {}
        same: dict[str, list[str]] = {}
        first: dict[tuple[tuple[str, Shape], ...], str] = {}
        for name, lay in layouts.items():
            key = tuple(sorted(lay.shapes.items()))
            if key in first:
                same.setdefault(first[key], []).append(name)
            else:
                first[key] = name
                kept[name] = lay
        if not kept:
            continue
        families[module] = {
            "representatives": _cover(kept),
            "patterns": sorted(set().union(*(lay.patterns for lay in kept.values()))),
            "members": [
                (
                    name,
                    len(lay.shapes),
                    signature(lay.shapes, lay.stem_key, lay.head_keys),
                    lay.stem,
                    lay.head,
                    lay.head_bias,
                )
                for name, lay in kept.items()
            ],
            "same_layout": same,
        }
        print(f"{module}: {len(kept)} members ({len(layouts) - len(kept)} look-alikes)")
    return families


def _packed(items: list[str], indent: int, width: int = 99) -> list[str]:
    """Items separated by commas, as many to a line as fit."""
    lines: list[str] = []
    line = " " * indent
    for item in items:
        if len(line) + len(item) + 1 > width and line.strip():
            lines.append(line.rstrip())
            line = " " * indent
        line += item + ", "
    if line.strip():
        lines.append(line.rstrip())
    return lines


def torchvision_twins(families: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """timm members that have a torchvision model's keys and shapes (stem width and classifier
    aside): {timm name: torchvision name}."""
    from bnfix.models import torchvision_zoo

    by_signature = {}
    for variants in torchvision_zoo.families().values():
        for variant in variants:
            lay = torchvision_zoo.torchvision_layout(variant.name, variant.kwargs)
            key = (lay.stem, lay.head, signature(lay.shapes, lay.stem_key, lay.head_keys))
            by_signature.setdefault(key, variant.name)
    twins = {}
    for entry in families.values():
        for name, _keys, sig, stem, head, _bias in entry["members"]:
            if (stem, head, sig) in by_signature:
                twins[name] = by_signature[(stem, head, sig)]
    return twins


def render(
    version: str,
    families: Mapping[str, Mapping[str, Any]],
    torchvision_version: str,
    twins: Mapping[str, str],
) -> str:
    """The catalogue as a Python module (compact, deterministic)."""

    def q(value: object) -> str:
        return json.dumps(value) if isinstance(value, str) else repr(value)

    out = [
        '"""Generated by ``python -m bnfix.models.update_timm_catalogue`` from the models',
        "themselves: timm's BatchNorm families (see bnfix.models.timm_zoo). Do not edit by hand.",
        "",
        "Members: (name, keys, signature, stem module, classifier module, classifier has a bias).",
        '"""',
        "",
        "# fmt: off",
        "from typing import Any",
        "",
        f"TIMM_VERSION = {q(version)}",
        f"TORCHVISION_VERSION = {q(torchvision_version)}",
        "",
        "FAMILIES: dict[str, dict[str, Any]] = {",
    ]
    for family, entry in families.items():
        out.append(f"    {q(family)}: {{")
        out.append('        "representatives": [')
        out += _packed([q(r) for r in entry["representatives"]], 12)
        out.append("        ],")
        out.append('        "patterns": [')
        out += _packed([q(p) for p in entry["patterns"]], 12)
        out.append("        ],")
        out.append('        "members": [')
        for name, keys, sig, stem, head, bias in entry["members"]:
            out.append(f"            ({q(name)}, {keys}, {q(sig)}, {q(stem)}, {q(head)}, {bias}),")
        out.append("        ],")
        out.append('        "same_layout": {')
        for name, others in entry["same_layout"].items():
            out.append(f"            {q(name)}: [")
            out += _packed([q(o) for o in others], 16)
            out.append("            ],")
        out.append("        },")
        out.append("    },")
    out.append("}")
    out.append("")
    out.append("# timm members with a torchvision model's keys and shapes: torchvision's name wins")
    out.append("TORCHVISION_TWINS: dict[str, str] = {")
    out += [f"    {q(name)}: {q(tv)}," for name, tv in twins.items()]
    out.append("}")
    if any(len(line) > 100 for line in out):
        out.insert(out.index("# fmt: off"), "# ruff: noqa: E501")
    return "\n".join(out) + "\n"


def write_catalogue(path: str) -> None:
    import timm
    import torchvision

    families = survey()
    text = render(timm.__version__, families, torchvision.__version__, torchvision_twins(families))
    with open(path, "w", encoding="utf-8") as file:
        file.write(text)


def check_catalogue() -> list[str]:
    """How the stored catalogue differs from what the installed timm builds (slow: builds
    every model); empty when it is current."""
    import timm
    import torchvision

    from bnfix.models import timm_catalogue as data

    problems = []
    if timm.__version__ != data.TIMM_VERSION:
        problems.append(f"written for timm {data.TIMM_VERSION}, installed {timm.__version__}")
    if torchvision.__version__ != data.TORCHVISION_VERSION:
        problems.append(
            f"written for torchvision {data.TORCHVISION_VERSION}, "
            f"installed {torchvision.__version__}"
        )
    families = survey()
    for family in sorted(set(families) | set(data.FAMILIES)):
        stored, built = data.FAMILIES.get(family), families.get(family)
        if stored is None or built is None:
            problems.append(f"family {family}: {'new' if stored is None else 'gone'}")
            continue
        was = {tuple(m) for m in stored["members"]}
        now = {tuple(m) for m in built["members"]}
        for member in sorted(now - was):
            problems.append(f"{family}: {member[0]} new or changed")
        for member in sorted(was - now):
            problems.append(f"{family}: {member[0]} gone or changed")
    if torchvision_twins(families) != data.TORCHVISION_TWINS:
        problems.append("torchvision twins changed")
    return problems
