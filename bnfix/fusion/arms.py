"""The arms ``--compare`` runs from one stage 1: mask rules, OGM-GE, their combinations, and
the stage-1 ensemble.

An arm is written ``rule``, ``ogm-ge``, ``rule+ogm-ge`` (masks and gradient modulation
together) or ``ensemble``. Its canonical name puts the mask rule first and leaves out
``none`` next to ``ogm-ge`` (``none+ogm-ge`` is ``ogm-ge``). The arm whose name is the
configured ``mask.rule`` runs in ``stage2/``, every other stage-2 arm in ``stage2-<arm>/``, the
ensemble in ``ensemble/``.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from bnfix.errors import BnfixError

__all__ = ["ARMS", "OGM", "Arm", "arm_phase", "parse_arm", "parse_arms"]

MASK_RULES = ("adaptive", "mean", "none", "reference")
OGM = "ogm-ge"
ENSEMBLE = "ensemble"
#: The plain arm names (combinations join a mask rule and ogm-ge with '+').
ARMS = (*MASK_RULES, OGM, ENSEMBLE)


@dataclass(frozen=True)
class Arm:
    """What one arm does: its mask rule, whether OGM-GE modulates the encoders' gradients,
    or the ensemble of the stage-1 models (no stage 2)."""

    name: str
    rule: str = "none"
    ogm: bool = False
    ensemble: bool = False


def parse_arm(text: str) -> Arm:
    """One arm from its written form (case and spaces ignored); unknown names say the nearest."""
    parts = [p.strip().lower() for p in text.split("+")]
    if any(not p for p in parts):
        raise BnfixError(f"--compare: empty arm name in {text!r}; arms: {_listing()}")
    for part in parts:
        if part not in ARMS:
            close = difflib.get_close_matches(part, ARMS, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise BnfixError(f"--compare: unknown arm {part!r}{hint} (arms: {_listing()})")
    if ENSEMBLE in parts:
        if len(parts) > 1:
            raise BnfixError(
                f"--compare: {ENSEMBLE} has no stage 2 and combines with nothing (got {text!r})"
            )
        return Arm(ENSEMBLE, ensemble=True)
    rules = [p for p in parts if p in MASK_RULES]
    ogm = parts.count(OGM)
    if len(rules) > 1 or ogm > 1:
        raise BnfixError(
            f"--compare: an arm combines at most one mask rule with {OGM} (got {text!r})"
        )
    rule = rules[0] if rules else "none"
    if not ogm:
        return Arm(rule, rule=rule)
    return Arm(OGM if rule == "none" else f"{rule}+{OGM}", rule=rule, ogm=True)


def parse_arms(spec: str | bool | list[str] | tuple[str, ...] | None, rule: str) -> list[Arm]:
    """The arms to run: ``True`` (bare ``--compare``): ``none`` and the configured rule;
    a comma-separated string or a list: those arms, in order; ``False``/None: none."""
    if spec is None or spec is False:
        return []
    if spec is True:
        names = ["none"] if rule == "none" else ["none", rule]
    else:
        names = spec.split(",") if isinstance(spec, str) else list(spec)
        if not [n for n in names if n.strip()]:
            raise BnfixError(f"--compare: no arm given; arms: {_listing()}")
    arms = [parse_arm(name) for name in names]
    seen: set[str] = set()
    for arm in arms:
        if arm.name in seen:
            raise BnfixError(f"--compare: arm {arm.name} is listed twice")
        seen.add(arm.name)
    return arms


def arm_phase(arm: Arm, rule: str) -> str:
    """The phase (folder) of an arm: the configured rule's is ``stage2``."""
    if arm.ensemble:
        return ENSEMBLE
    return "stage2" if arm.name == rule else f"stage2-{arm.name}"


def _listing() -> str:
    return ", ".join(ARMS) + f", a rule+{OGM} combination"
