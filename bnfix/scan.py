"""The scan: static signals from a checkpoint's BN parameters, plus probe signals when a probe runs.

Reports are plain dataclasses; rendering (table, JSON, plot) lives in :mod:`bnfix.report`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from bnfix.bn_layers import BNParams, find_bn_layers
from bnfix.checkpoint import Checkpoint
from bnfix.errors import BnfixError, one_line
from bnfix.masks import (
    Thresholds,
    abnormal_mask,
    always_dead_mask,
    collapsed_mask,
    indices,
    invalid_mask,
    zero_layer,
)
from bnfix.probe_stats import (
    ChannelStats,
    bn_eps,
    bn_modules,
    collect,
    log_var_ratio,
    mean_shift,
)

#: Lint codes a layer can carry: stored tensors or settings no healthy pretrained BN has.
NON_FINITE, NEGATIVE_VAR = "non_finite", "negative_var"
UNTRAINED_STATS, KERAS_MOMENTUM, ZERO_LAYER = "untrained_stats", "keras_momentum", "zero_layer"
LINT_CODES = (NON_FINITE, NEGATIVE_VAR, UNTRAINED_STATS, KERAS_MOMENTUM, ZERO_LAYER)
#: PyTorch's momentum weighs the new batch (default 0.1); Keras' weighs the old value (0.99).
#: A ported model that kept Keras' number forgets its statistics almost every batch.
KERAS_MOMENTUM_ABOVE = 0.5
#: Why a probe scan could not judge a layer.
UNREACHED = "not reached by the probe"
NON_FINITE_OUTPUT = "non-finite outputs on the probe"


@dataclass
class LayerScan:
    name: str
    channels: int
    abnormal: list[int]
    always_dead: list[int]
    collapsed: list[int]
    invalid: list[int] = field(default_factory=list)  # NaN/Inf stored, or negative variance
    lint: list[str] = field(default_factory=list)
    dead: list[int] | None = None  # None: not judged on a probe (see ``unjudged``)
    active_fraction: list[float] | None = None
    dead_sample_fraction: list[float] | None = None
    mean_shift: float | None = None
    log_var_ratio: float | None = None
    unjudged: str | None = None  # why a probe could not judge this layer

    @property
    def unusable(self) -> set[int]:
        """Channels that contribute nothing: always dead, dead on the probe, or invalid."""
        return set(self.always_dead) | set(self.dead or ()) | set(self.invalid)


@dataclass
class ScanSummary:
    bn_layers: int
    channels: int
    abnormal: int
    always_dead: int
    collapsed: int
    invalid: int
    dead: int | None
    capacity_used: float | None  # over the layers the probe judged; None without a probe
    unusable: int  # dead on the probe, always dead or invalid: what ``--fail-on`` counts
    unjudged_layers: int  # probed scans: layers the probe did not reach or could not judge
    lint: dict[str, int] = field(default_factory=dict)  # code -> number of layers


@dataclass
class CheckpointScan:
    path: str
    sha256: str
    architecture: str | None
    modality: str | None
    probe_samples: int
    layers: list[LayerScan]
    notes: list[str] = field(default_factory=list)
    probe_files: int = 0  # probe files found, before --probe-limit
    probe_sources: list[str] = field(default_factory=list)  # the files the samples came from
    probe: str | None = None  # the probe path the user gave
    #: arguments a repair of it needs to see the same model and probe (--select, --arch, the
    #: probe's feature options, as the scan was given them), for the command it recommends
    repeat: list[str] = field(default_factory=list)

    def set_probe(self, path: str | None, files: int, sources: list[str]) -> None:
        """Record the probe, which of its files were found and which were used."""
        self.probe, self.probe_files = path, files
        self.probe_sources = list(dict.fromkeys(sources))

    @property
    def probe_description(self) -> str:
        """ "128 of 137 files" when a limit left files out."""
        used, noun = len(self.probe_sources), "file" if self.probe_files == 1 else "files"
        return (
            f"{used} of {self.probe_files} {noun}" if used < self.probe_files else f"{used} {noun}"
        )

    @property
    def summary(self) -> ScanSummary:
        probed = self.probe_samples > 0
        channels = sum(layer.channels for layer in self.layers)
        unusable = sum(len(layer.unusable) for layer in self.layers)
        # Capacity is measured where the probe measured: a layer it never reached (or whose
        # outputs were NaN) is neither used nor unused, so it is left out, not counted as live.
        judged = [layer for layer in self.layers if layer.dead is not None]
        judged_channels = sum(layer.channels for layer in judged)
        judged_unusable = sum(len(layer.unusable) for layer in judged)
        capacity = 1 - judged_unusable / judged_channels if probed and judged_channels else None
        lint: dict[str, int] = {}
        for layer in self.layers:
            for code in layer.lint:
                lint[code] = lint.get(code, 0) + 1
        return ScanSummary(
            bn_layers=len(self.layers),
            channels=channels,
            abnormal=sum(len(layer.abnormal) for layer in self.layers),
            always_dead=sum(len(layer.always_dead) for layer in self.layers),
            collapsed=sum(len(layer.collapsed) for layer in self.layers),
            invalid=sum(len(layer.invalid) for layer in self.layers),
            dead=sum(len(layer.dead or ()) for layer in self.layers) if probed else None,
            capacity_used=capacity,
            unusable=unusable,
            unjudged_layers=len(self.layers) - len(judged) if probed else 0,
            lint=lint,
        )

    @property
    def unusable_fraction(self) -> float:
        summary = self.summary
        return summary.unusable / summary.channels if summary.channels else 0.0


def static_layer(bn: BNParams, t: Thresholds) -> LayerScan:
    lint = lint_codes(bn)
    layer = LayerScan(
        name=bn.name,
        channels=bn.channels,
        abnormal=indices(abnormal_mask(bn.weight, bn.bias, t)),
        always_dead=indices(always_dead_mask(bn.weight, bn.bias, t)),
        collapsed=indices(collapsed_mask(bn.running_var, t)),
        invalid=indices(invalid_mask(bn.weight, bn.bias, bn.running_mean, bn.running_var)),
        lint=lint,
    )
    if ZERO_LAYER in lint:
        # γ = β = 0 everywhere is a design (zero-initialised residual branch: the block starts
        # as the identity) or an untrained file, not channels that died in pretraining.
        layer.abnormal, layer.always_dead = [], []
    if UNTRAINED_STATS in lint:
        layer.collapsed = []
    return layer


def lint_codes(bn: BNParams) -> list[str]:
    """What is wrong with a layer's stored tensors as a whole, as stable codes."""
    codes = []
    tensors = (bn.weight, bn.bias, bn.running_mean, bn.running_var)
    if not all(bool(torch.isfinite(x).all()) for x in tensors):
        codes.append(NON_FINITE)
    if bool((bn.running_var < 0).any()):
        codes.append(NEGATIVE_VAR)
    if (
        bn.batches_tracked in (None, 0)
        and bool((bn.running_mean == 0).all())
        and bool((bn.running_var == 1).all())
    ):
        codes.append(UNTRAINED_STATS)  # the constructor's values: never estimated on data
    if zero_layer(bn.weight, bn.bias):
        codes.append(ZERO_LAYER)
    return codes


def add_module_lint(layer: LayerScan, module: torch.nn.Module) -> None:
    """Lint only a built model shows: its momentum is not in the state dict."""
    momentum = getattr(getattr(module, "original", module), "momentum", None)
    if (
        momentum is not None
        and momentum > KERAS_MOMENTUM_ABOVE
        and KERAS_MOMENTUM not in layer.lint
    ):
        layer.lint.append(KERAS_MOMENTUM)


def add_probe_signals(
    layer: LayerScan, bn: BNParams, stats: ChannelStats, eps: float, t: Thresholds
) -> None:
    if stats.non_finite:
        # NaN compares false, so NaN outputs would read as "never positive": dead. They say
        # nothing about this layer's channels (an earlier layer's NaN reaches every later one).
        layer.unjudged = NON_FINITE_OUTPUT
        return
    # A zero layer outputs exactly 0: "dead" by the count, but by design (see static_layer).
    dead = stats.dead_sample_fraction >= t.dead_fraction
    layer.dead = [] if ZERO_LAYER in layer.lint else indices(dead)
    layer.active_fraction = [round(v, 6) for v in stats.active_fraction.tolist()]
    layer.dead_sample_fraction = [round(v, 6) for v in stats.dead_sample_fraction.tolist()]
    layer.mean_shift = mean_shift(stats, bn.running_mean, bn.running_var, eps)
    layer.log_var_ratio = log_var_ratio(stats, bn.running_var, eps)


def scan_static(ckpt: Checkpoint, t: Thresholds = Thresholds()) -> CheckpointScan:
    """The scan every checkpoint gets: no model, no data, just the stored BN tensors."""
    return _static(ckpt, find_bn_layers(ckpt.state_dict), t)


def _static(ckpt: Checkpoint, bns: list[BNParams], t: Thresholds) -> CheckpointScan:
    if not bns:
        raise BnfixError(
            "no BatchNorm layer found (no keys ending in weight/bias/running_mean/running_var "
            "of equal length); nothing to scan",
            ckpt.path,
        )
    return CheckpointScan(
        path=str(ckpt.path),
        sha256=ckpt.sha256,
        architecture=None,
        modality=None,
        probe_samples=0,
        layers=[static_layer(bn, t) for bn in bns],
        notes=list(ckpt.unwrapped),
    )


def scan_probe(
    ckpt: Checkpoint,
    model: torch.nn.Module,
    batches: Iterable[torch.Tensor],
    *,
    modality: str | None,
    t: Thresholds = Thresholds(),
    device: torch.device | str = "cpu",
    probe_path: str | None = None,
) -> CheckpointScan:
    """Static scan plus what the probe shows, with ``model`` holding ``ckpt``'s weights.

    Layers are listed in the model's order, not the file's: safetensors stores keys sorted
    by name (timm's ``stem.bn`` after ``s1.*``, DenseNet's ``features.norm0`` after the
    blocks), and the recommendation reads "early" and "stem" off the order."""
    modules = bn_modules(model)  # in module order; .to() below moves them in place
    order = {name: i for i, name in enumerate(modules)}
    bns = sorted(find_bn_layers(ckpt.state_dict), key=lambda bn: order.get(bn.name, len(order)))
    report = _static(ckpt, bns, t)
    report.modality = modality
    model = model.to(device=device, dtype=torch.float32)  # half-precision checkpoints too
    try:
        stats = collect(model, batches, device)
    except RuntimeError as exc:
        message = one_line(exc, limit=200)
        raise BnfixError(f"the model cannot run on this probe ({message})", probe_path) from None
    for layer, bn in zip(report.layers, bns, strict=True):
        if layer.name in modules:
            add_module_lint(layer, modules[layer.name])
        if layer.name in stats and layer.name in modules:
            add_probe_signals(layer, bn, stats[layer.name], bn_eps(modules[layer.name]), t)
    for layer in report.layers:
        if layer.dead is None and layer.unjudged is None:
            layer.unjudged = UNREACHED
    unreached = [layer.name for layer in report.layers if layer.unjudged == UNREACHED]
    if unreached:
        report.notes.append(
            f"{len(unreached)} BN layers were not reached by the probe (e.g. {unreached[0]}); "
            "capacity is measured over the layers it reached"
        )
    nan_layers = [layer.name for layer in report.layers if layer.unjudged == NON_FINITE_OUTPUT]
    if nan_layers:
        report.notes.append(
            f"{len(nan_layers)} BN layers could not be judged: their outputs on the probe were "
            f"NaN/Inf (first {nan_layers[0]}); fix the non-finite tensors first"
        )
    report.probe_samples = max((st.samples for st in stats.values()), default=0)
    return report
