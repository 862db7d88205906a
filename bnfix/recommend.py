"""What a scan tells the user to do: leave the checkpoint alone, recalibrate its statistics, or
repair it with ABRi.

Repair is not free: on a healthy checkpoint the fresh twins dilute features that work (a user
measured −12 points on real drums after repairing a MobileNetV2 that had lost 0.4% of its
channels). It pays when the probe shows capacity really lost, and lost early, where a dead
channel starves everything after it. A large domain gap with intact channels is a statistics
problem, which recalibration (AdaBN) fixes without touching what the weights learned. The
thresholds below come from ``benchmarks/recommendation_study.py``; README gives the numbers.
"""

from __future__ import annotations

import shlex
from dataclasses import asdict, dataclass, field

from bnfix.scan import (
    KERAS_MOMENTUM,
    NEGATIVE_VAR,
    NON_FINITE,
    UNTRAINED_STATS,
    CheckpointScan,
    LayerScan,
)

#: The share of the network's BN layers (in forward order) counted as "early".
EARLY_DEPTH = 0.5
#: Repair when a judged early layer lost at least this share of its channels on the probe...
REPAIR_LAYER_SHARE = 0.5
#: ... or the whole network lost at least this share of its judged channels.
REPAIR_CAPACITY_LOST = 0.10
#: Without a probe: repair when a layer holds at least this share of abnormal pairs (the
#: paper's VGGSound ResNet-18 has 35–95% in every layer; healthy ImageNet weights ~0%).
REPAIR_ABNORMAL_SHARE = 0.25
#: Recalibrate when the stem's BN input is this far from its stored statistics: |log σ² ratio|
#: (e as a variance factor of e ≈ 2.7) or a standardised mean shift of this many σ.
RECALIBRATE_GAP = 1.0
#: The first layers whose domain gap counts as "at the stem".
STEM_LAYERS = 3
#: Layers listed in ``domain_gap``: the largest gaps, so the JSON stays readable.
GAP_LAYERS_SHOWN = 5

NONE, RECALIBRATE, REPAIR = "none", "recalibrate", "repair"


@dataclass
class Recommendation:
    action: str  # "none" | "recalibrate" | "repair"
    reasons: list[str]
    capacity_lost: float | None  # 1 − capacity used, over the judged layers; None: no probe
    early_capacity_lost: float | None  # the same over the early layers
    worst_layer: dict | None  # {"name", "depth", "dead_share"}: the judged layer that lost most
    stem_gap: dict | None  # {"name", "mean_shift", "log_var_ratio"} of the largest stem gap
    domain_gap: list[dict] = field(default_factory=list)  # largest gaps, per layer
    command: str | None = None  # what to run next

    def as_dict(self) -> dict:
        return asdict(self)


def _share(layer: LayerScan) -> float:
    return len(layer.unusable) / layer.channels if layer.channels else 0.0


def _gap(layer: LayerScan) -> float:
    """The larger of a layer's two domain-gap numbers (NaN/None count as no gap)."""
    values = [abs(v) for v in (layer.mean_shift, layer.log_var_ratio) if v is not None and v == v]
    return max(values, default=0.0)


def _gap_dict(layer: LayerScan) -> dict:
    return {
        "name": layer.name,
        "mean_shift": layer.mean_shift,
        "log_var_ratio": layer.log_var_ratio,
    }


def _lost(layers: list[LayerScan]) -> float | None:
    channels = sum(layer.channels for layer in layers)
    return sum(len(layer.unusable) for layer in layers) / channels if channels else None


def recommend(scan: CheckpointScan) -> Recommendation:
    """The action a scan supports, with the numbers behind it and a reason for each rule."""
    layers = scan.layers
    early_count = max(1, round(len(layers) * EARLY_DEPTH))
    depth = {layer.name: i / max(1, len(layers) - 1) for i, layer in enumerate(layers)}
    reasons: list[str] = []
    if scan.probe_samples == 0:
        return _static(scan, layers, reasons)

    judged = [layer for layer in layers if layer.dead is not None]
    early = [layer for layer in layers[:early_count] if layer.dead is not None]
    worst = max(judged, key=_share, default=None)
    stem = [layer for layer in layers[:STEM_LAYERS] if layer.dead is not None]
    stem_worst = max(stem, key=_gap, default=None)
    rec = Recommendation(
        action=NONE,
        reasons=reasons,
        capacity_lost=_lost(judged),
        early_capacity_lost=_lost(early),
        worst_layer=None
        if worst is None
        else {
            "name": worst.name,
            "depth": round(depth[worst.name], 3),
            "dead_share": _share(worst),
        },
        stem_gap=None if stem_worst is None else _gap_dict(stem_worst),
        domain_gap=[
            _gap_dict(x) for x in sorted(judged, key=_gap, reverse=True)[:GAP_LAYERS_SHOWN]
        ],
    )
    if not judged:
        reasons.append("the probe could judge no layer; fix the checkpoint's NaN/Inf first")
        _lint_reasons(scan, rec)
        return rec
    collapsed_early = [x for x in early if _share(x) >= REPAIR_LAYER_SHARE]
    if collapsed_early:
        names = ", ".join(x.name for x in collapsed_early[:3])
        more = f" and {len(collapsed_early) - 3} more" if len(collapsed_early) > 3 else ""
        reasons.append(
            f"{len(collapsed_early)} early {'layer' if len(collapsed_early) == 1 else 'layers'} "
            f"lost ≥{REPAIR_LAYER_SHARE:.0%} of their channels on the probe ({names}{more}): "
            "dead early channels starve everything after them"
        )
    if rec.capacity_lost is not None and rec.capacity_lost >= REPAIR_CAPACITY_LOST:
        reasons.append(
            f"{rec.capacity_lost:.1%} of the judged channels are dead on the probe "
            f"(≥{REPAIR_CAPACITY_LOST:.0%})"
        )
    if reasons:
        rec.action = REPAIR
    elif stem_worst is not None and _gap(stem_worst) >= RECALIBRATE_GAP:
        rec.action = RECALIBRATE
        reasons.append(
            f"only {rec.capacity_lost:.1%} of channels dead, but {stem_worst.name}'s input is far "
            f"from its stored statistics (mean shift {stem_worst.mean_shift:.2f}, log σ² ratio "
            f"{stem_worst.log_var_ratio:+.2f}): recalibrate; repairing healthy channels costs "
            "accuracy"
        )
    else:
        reasons.append(
            f"{rec.capacity_lost:.1%} of channels dead and the stem's statistics fit the probe: "
            "fine-tune as is"
        )
    _lint_reasons(scan, rec)
    rec.command = _command(scan, rec.action)
    return rec


def _static(scan: CheckpointScan, layers: list[LayerScan], reasons: list[str]) -> Recommendation:
    rec = Recommendation(NONE, reasons, None, None, None, None)
    heavy = [
        x for x in layers if x.channels and len(x.abnormal) / x.channels >= REPAIR_ABNORMAL_SHARE
    ]
    if heavy:
        rec.action = REPAIR
        reasons.append(
            f"{len(heavy)} {'layer holds' if len(heavy) == 1 else 'layers hold'} "
            f"≥{REPAIR_ABNORMAL_SHARE:.0%} abnormal γ/β pairs (e.g. {heavy[0].name}): channels "
            "pretraining switched off; a probe of your data would confirm"
        )
    else:
        reasons.append(
            "no layer holds many abnormal pairs; add --probe with your target data to judge "
            "dead channels and the domain gap"
        )
    _lint_reasons(scan, rec)
    rec.command = _command(scan, rec.action)
    return rec


def _lint_reasons(scan: CheckpointScan, rec: Recommendation) -> None:
    """Lint changes the advice: statistics never estimated (or broken) need estimating."""
    lint = scan.summary.lint
    stats_only = {UNTRAINED_STATS, NEGATIVE_VAR} & set(lint)
    if stats_only and rec.action == NONE:
        rec.action = RECALIBRATE
    if lint.get(UNTRAINED_STATS):
        rec.reasons.append(
            f"{lint[UNTRAINED_STATS]} BN layers hold statistics never estimated on data "
            "(mean 0, var 1): recalibrate on your data before evaluating in eval mode"
        )
    if lint.get(NEGATIVE_VAR):
        rec.reasons.append(
            f"{lint[NEGATIVE_VAR]} BN layers store a negative variance: recalibration replaces it"
        )
    if lint.get(NON_FINITE):
        rec.reasons.append(
            f"{lint[NON_FINITE]} BN layers hold NaN/Inf: re-export the checkpoint or reset those "
            "layers; neither ABRi nor recalibration fixes a NaN γ or β"
        )
    if lint.get(KERAS_MOMENTUM):
        rec.reasons.append(
            f"{lint[KERAS_MOMENTUM]} BN layers have momentum > 0.5 (Keras' convention): set "
            "momentum = 1 − m before fine-tuning"
        )


def _command(scan: CheckpointScan, action: str) -> str | None:
    """The command to run next, each argument shell-quoted so it pastes as one (a path with
    spaces or quotes); plain arguments stay as they are. Placeholders (``audio|visual``,
    ``PROBE``) are left bare: they are meant to be replaced, not run."""
    q = shlex.quote
    modality = f" --modality {q(scan.modality)}" if scan.modality else " --modality audio|visual"
    probe = f" --probe {q(str(scan.probe)) if scan.probe else 'PROBE'}"
    probe += "".join(f" {q(arg)}" for arg in scan.repeat)  # the same model and features
    path = q(str(scan.path))
    if action == REPAIR:
        # ABRi's fresh twins start at mean 0 / var 1: without recalibration the repaired model's
        # eval mode is far off (benchmarks/recommendation_study.py: 20% vs 72% on a healthy one).
        return f"bnfix repair {path}{modality}{probe} --recalibrate"
    if action == RECALIBRATE:
        return f"bnfix repair {path}{modality} --strategy keep{probe} --recalibrate"
    return None
