"""Rendering of scan reports: a rich table, the versioned JSON document and a per-layer plot."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bnfix.checkpoint import write_atomic
from bnfix.errors import BnfixError
from bnfix.jsonio import dumps
from bnfix.recommend import recommend
from bnfix.scan import (
    KERAS_MOMENTUM,
    UNREACHED,
    UNTRAINED_STATS,
    ZERO_LAYER,
    CheckpointScan,
    LayerScan,
)

SCHEMA = "bnfix.scan/1"
#: A layer is flagged when at least this share of its channels is dead or abnormal.
WARN_SHARE = 0.10
#: Standardised mean shift / |log variance ratio| above which the probe is far from the
#: statistics the checkpoint was trained with (recalibration or repair worth considering).
WARN_SHIFT = 1.0
#: The warning column's words for the lint codes not already told by the channel counts.
LINT_WORDS = {
    UNTRAINED_STATS: "stats never estimated",
    KERAS_MOMENTUM: "Keras momentum",
    ZERO_LAYER: "γ=β=0 (zero-init branch?)",
}


# --------------------------------------------------------------------------- JSON


def to_json(scans: Sequence[CheckpointScan]) -> dict:
    return {"schema": SCHEMA, "checkpoints": [_checkpoint_json(s) for s in scans]}


def _checkpoint_json(scan: CheckpointScan) -> dict:
    summary = scan.summary
    return {
        "path": scan.path,
        "sha256": scan.sha256,
        "architecture": scan.architecture,
        "modality": scan.modality,
        "probe_samples": scan.probe_samples,
        "probe_files": scan.probe_files,
        "probe_sources": scan.probe_sources,
        "notes": scan.notes,
        "verdict": verdict(scan),
        "recommendation": recommend(scan).as_dict(),
        "summary": {
            "bn_layers": summary.bn_layers,
            "channels": summary.channels,
            "abnormal": summary.abnormal,
            "always_dead": summary.always_dead,
            "collapsed": summary.collapsed,
            "invalid": summary.invalid,
            "dead": summary.dead,
            "capacity_used": summary.capacity_used,
            "unusable": summary.unusable,
            "unjudged_layers": summary.unjudged_layers,
            "lint": summary.lint,
        },
        "layers": [_layer_json(layer) for layer in scan.layers],
    }


def _layer_json(layer: LayerScan) -> dict:
    return {
        "name": layer.name,
        "channels": layer.channels,
        "abnormal": layer.abnormal,
        "always_dead": layer.always_dead,
        "collapsed": layer.collapsed,
        "invalid": layer.invalid,
        "lint": layer.lint,
        "dead": layer.dead,
        "unjudged": layer.unjudged,
        "active_fraction": layer.active_fraction,
        "dead_sample_fraction": layer.dead_sample_fraction,
        "mean_shift": _finite(layer.mean_shift),
        "log_var_ratio": _finite(layer.log_var_ratio),
    }


def _finite(value: float | None) -> float | None:
    """JSON has no NaN; a layer whose statistic is undefined reports null."""
    return None if value is None or value != value else value


def write_json(scans: Sequence[CheckpointScan], target: str, console: Console) -> None:
    text = dumps(to_json(scans), indent=1)
    if target == "-":
        console.file.write(text + "\n")
        console.file.flush()
    else:
        write_atomic(Path(target), (text + "\n").encode())


# --------------------------------------------------------------------------- verdicts


def layer_warning(layer: LayerScan) -> str:
    """The warning column: the few words that say why a layer deserves a look."""
    words = []
    share = len(layer.unusable) / layer.channels
    if share >= WARN_SHARE:
        words.append(f"{share:.0%} dead")
    if len(layer.abnormal) / layer.channels >= WARN_SHARE:
        words.append(f"{len(layer.abnormal) / layer.channels:.0%} abnormal")
    if layer.collapsed:
        words.append("collapsed var")
    if layer.invalid:
        words.append(f"{len(layer.invalid)} NaN/Inf or negative-var")
    words += [LINT_WORDS[code] for code in layer.lint if code in LINT_WORDS]
    if layer.unjudged and layer.unjudged != UNREACHED:
        words.append("not judged")
    shift, ratio = _finite(layer.mean_shift) or 0.0, _finite(layer.log_var_ratio) or 0.0
    if shift > WARN_SHIFT or abs(ratio) > WARN_SHIFT:
        words.append("domain gap")
    return ", ".join(words)


def verdict(scan: CheckpointScan) -> str:
    """One line a user can act on."""
    s = scan.summary
    arch = scan.architecture or "unrecognised architecture"
    broken = ""
    if s.invalid:
        flagged = sum(bool(layer.invalid) for layer in scan.layers)
        broken = (
            f"; {s.invalid:,} channels in {flagged} {'layer' if flagged == 1 else 'layers'} hold "
            "NaN/Inf or a negative variance (counted as dead)"
        )
    told = [f"{s.lint[code]} {LINT_WORDS[code]}" for code in LINT_WORDS if s.lint.get(code)]
    if told:
        broken += f"; lint (layers): {', '.join(told)}"
    if s.dead is None:
        return (
            f"{arch}: {s.abnormal:,} abnormal pairs, {s.always_dead:,} always-dead and "
            f"{s.collapsed:,} collapsed channels of {s.channels:,}{broken} (static only; add "
            "--probe to measure dead channels on your data)"
        )
    on = f"on {scan.probe_samples} {scan.modality or 'probe'} samples"
    if scan.probe_files:
        on += f" ({scan.probe_description})"
    share = s.unusable / s.channels
    line = f"{arch} {on}: {s.unusable:,} of {s.channels:,} channels dead ({share:.1%})"
    if s.capacity_used is None:
        return line + f"{broken}; the probe could judge none of the {s.bn_layers} BN layers"
    line += f", capacity used {s.capacity_used:.1%}"
    if s.unjudged_layers:
        line += f" (over the {s.bn_layers - s.unjudged_layers} of {s.bn_layers} layers judged)"
    line += broken
    judged = [layer for layer in scan.layers if layer.dead is not None]
    worst = max(judged, key=lambda layer: len(layer.unusable) / layer.channels)
    worst_share = len(worst.unusable) / worst.channels
    if worst_share >= WARN_SHARE:
        flagged = sum(len(x.unusable) / x.channels >= WARN_SHARE for x in judged)
        layers = "layer" if flagged == 1 else "layers"
        line += (
            f"; {flagged} {layers} ≥{WARN_SHARE:.0%} dead, worst {worst.name} ({worst_share:.0%})"
        )
    elif not s.invalid:
        line += "; no layer is badly affected"
    return line


# --------------------------------------------------------------------------- tables


def _count(values: list[int] | None) -> str:
    if values is None:
        return "–"
    return str(len(values)) if values else "·"


def _num(value: float | None, fmt: str) -> str:
    return "–" if value is None or value != value else format(value, fmt)


def single_table(scan: CheckpointScan) -> Table:
    probed = scan.probe_samples > 0
    title = f"{Path(scan.path).name} — {scan.architecture or 'architecture not recognised'}"
    if probed:
        title += f" — {scan.probe_samples} {scan.modality or 'probe'} samples"
        if scan.probe_files:
            title += f" from {scan.probe_description}"
    table = Table(title=title, title_justify="left", header_style="bold", show_lines=False)
    table.add_column("BN layer", no_wrap=True)
    table.add_column("ch", justify="right")
    table.add_column("abnormal", justify="right")
    table.add_column("always\ndead", justify="right")
    table.add_column("collapsed", justify="right")
    if probed:
        table.add_column("dead", justify="right")
        table.add_column("dead\n%", justify="right")
        table.add_column("active\n%", justify="right")
        table.add_column("mean\nshift", justify="right")
        table.add_column("log σ²\nratio", justify="right")
    table.add_column("warning", style="yellow", ratio=1)
    for layer in scan.layers:
        row = [
            layer.name,
            str(layer.channels),
            _count(layer.abnormal),
            _count(layer.always_dead),
            _count(layer.collapsed),
        ]
        if probed:
            active = layer.active_fraction
            row += [
                _count(layer.dead),
                f"{len(layer.unusable) / layer.channels:.0%}",
                _num(sum(active) / len(active) * 100, ".0f") if active else "–",
                _num(layer.mean_shift, ".2f"),
                _num(layer.log_var_ratio, "+.2f"),
            ]
        row.append(layer_warning(layer))
        table.add_row(*row)
    return table


def side_by_side_table(
    scans: Sequence[CheckpointScan], labels: Sequence[str] | None = None
) -> Table:
    """Layers aligned by name across checkpoints: the paper's before/after view."""
    table = Table(title="BN layers side by side", title_justify="left", header_style="bold")
    table.add_column("BN layer", no_wrap=True)
    table.add_column("ch", justify="right")
    for i, scan in enumerate(scans, 1):
        label = f"[{i}] {labels[i - 1] if labels else Path(scan.path).name}"
        table.add_column(f"{label}\nabnormal", justify="right")
        table.add_column(f"{label}\ndead %", justify="right")
    names = _layer_union(scans)
    by_name = [{layer.name: layer for layer in scan.layers} for scan in scans]
    for name in names:
        channels = next(m[name].channels for m in by_name if name in m)
        row = [name, str(channels)]
        for layers in by_name:
            layer = layers.get(name)
            if layer is None:
                row += ["–", "–"]
                continue
            probed = layer.dead is not None
            dead = f"{len(layer.unusable) / layer.channels:.0%}" if probed else "–"
            row += [_count(layer.abnormal), dead]
        table.add_row(*row)
    return table


def render(
    scans: Sequence[CheckpointScan],
    console: Console,
    labels: Sequence[str] | None = None,
    show_recommendation: bool = True,
) -> None:
    if len(scans) == 1:
        console.print(single_table(scans[0]))
    else:
        console.print(side_by_side_table(scans, labels))
    for i, scan in enumerate(scans, 1):
        prefix = f"[{i}] " if len(scans) > 1 else ""
        if labels:
            prefix = f"[{i}] {labels[i - 1]}: "
        for note in scan.notes:
            console.print(f"{prefix}[dim]note: {note}[/dim]", highlight=False)
        console.print(f"{prefix}[bold]verdict:[/bold] {verdict(scan)}", highlight=False)
        if show_recommendation:
            rec = recommend(scan)
            console.print(
                f"{prefix}[bold]recommendation: {rec.action}[/bold] — {'; '.join(rec.reasons)}",
                highlight=False,
            )
            if rec.command:
                console.print(f"{prefix}  next: {escape(rec.command)}", highlight=False)


# --------------------------------------------------------------------------- plot


def plot(
    scans: Sequence[CheckpointScan], target: Path, labels: Sequence[str] | None = None
) -> None:
    """Per-layer bars (paper, Fig. 2a) named by layer, one bar per checkpoint in each group:
    the dead share with a probe (abnormal share without), and under it the domain gap (mean
    shift and log variance ratio) when any checkpoint was probed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BnfixError("--plot needs matplotlib: pip install 'bnfix[plot]'") from None
    names = _layer_union(scans)
    by_name = [{layer.name: layer for layer in scan.layers} for scan in scans]
    probed = any(scan.probe_samples > 0 for scan in scans)
    panels = 2 if probed else 1
    fig, axes = plt.subplots(
        panels,
        1,
        figsize=(max(8, 0.22 * len(names) + 2), 3.4 * panels + 1.2),
        squeeze=False,
        sharex=True,
    )
    width = 0.8 / len(scans)
    tallest = 0.0
    for i, (scan, layers) in enumerate(zip(scans, by_name, strict=True)):
        label = labels[i] if labels else f"{Path(scan.path).name} ({scan.architecture or '?'})"
        label = f"({i + 1}) {label}"
        offset = (i - (len(scans) - 1) / 2) * width
        if scan.probe_samples > 0:
            share = [_plot_share(layers.get(n), dead=True) for n in names]
            label += " — dead %"
        else:
            share = [_plot_share(layers.get(n), dead=False) for n in names]
            label += " — abnormal %"
        tallest = max(tallest, *share)
        axes[0, 0].bar([x + offset for x in range(len(names))], share, width, label=label)
        if probed:
            shift = [_gap_value(layers.get(n), "mean_shift") for n in names]
            ratio = [_gap_value(layers.get(n), "log_var_ratio") for n in names]
            xs = [x + offset for x in range(len(names))]
            axes[1, 0].bar(xs, shift, width, label=f"mean shift ({i + 1})")
            axes[1, 0].plot(xs, ratio, "o", markersize=3, label=f"log σ² ratio ({i + 1})")
    axes[0, 0].set_ylabel("% of channels")
    axes[0, 0].set_ylim(0, min(100.0, max(10.0, 1.15 * tallest)))
    axes[0, 0].legend(fontsize=8)
    axes[0, 0].set_title("BN layers (network order)", fontsize=9)
    if probed:
        axes[1, 0].axhline(0, color="black", linewidth=0.5)
        for level in (WARN_SHIFT, -WARN_SHIFT):
            axes[1, 0].axhline(level, color="grey", linestyle=":", linewidth=0.8)
        axes[1, 0].set_ylabel("domain gap")
        axes[1, 0].legend(fontsize=7)
    bottom = axes[-1, 0]
    bottom.set_xticks(range(len(names)))
    bottom.set_xticklabels(names, rotation=90, fontsize=6)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    write_atomic(target, buffer.getvalue())


def _layer_union(scans: Sequence[CheckpointScan]) -> list[str]:
    names: list[str] = []
    seen: set[str] = set()
    for scan in scans:
        for layer in scan.layers:
            if layer.name not in seen:
                seen.add(layer.name)
                names.append(layer.name)
    return names


def _plot_share(layer: LayerScan | None, dead: bool) -> float:
    if layer is None or not layer.channels:
        return 0.0
    return 100 * len(layer.unusable if dead else layer.abnormal) / layer.channels


def _gap_value(layer: LayerScan | None, key: str) -> float:
    value = None if layer is None else _finite(getattr(layer, key))
    return 0.0 if value is None else value
