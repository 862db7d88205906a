"""Rendering of scan reports: a rich table, the versioned JSON document and a per-layer plot."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bnfix.checkpoint import write_atomic
from bnfix.errors import BnfixError
from bnfix.jsonio import dumps
from bnfix.scan import UNREACHED, CheckpointScan, LayerScan

SCHEMA = "bnfix.scan/1"
#: A layer is flagged when at least this share of its channels is dead or abnormal.
WARN_SHARE = 0.10
#: Standardised mean shift / |log variance ratio| above which the probe is far from the
#: statistics the checkpoint was trained with (recalibration or repair worth considering).
WARN_SHIFT = 1.0


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
        "notes": scan.notes,
        "verdict": verdict(scan),
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
    if s.dead is None:
        return (
            f"{arch}: {s.abnormal:,} abnormal pairs, {s.always_dead:,} always-dead and "
            f"{s.collapsed:,} collapsed channels of {s.channels:,}{broken} (static only; add "
            "--probe to measure dead channels on your data)"
        )
    on = f"on {scan.probe_samples} {scan.modality or 'probe'} samples"
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
            f"; {flagged} {layers} ≥{WARN_SHARE:.0%} dead, worst {worst.name} "
            f"({worst_share:.0%}): a candidate for ABRi re-initialisation"
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
    names: list[str] = []
    for scan in scans:
        names += [layer.name for layer in scan.layers if layer.name not in names]
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
    scans: Sequence[CheckpointScan], console: Console, labels: Sequence[str] | None = None
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


# --------------------------------------------------------------------------- plot


def plot(scans: Sequence[CheckpointScan], target: Path) -> None:
    """Per-layer bars of abnormal and dead shares, one panel per checkpoint (paper, Fig. 2a)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BnfixError("--plot needs matplotlib: pip install 'bnfix[plot]'") from None
    fig, axes = plt.subplots(
        len(scans),
        1,
        figsize=(max(8, 0.18 * max(len(s.layers) for s in scans)), 3.2 * len(scans)),
        squeeze=False,
    )
    for ax, scan in zip(axes[:, 0], scans, strict=True):
        xs = range(len(scan.layers))
        abnormal = [100 * len(x.abnormal) / x.channels for x in scan.layers]
        probed = scan.probe_samples > 0
        dead = [100 * len(x.unusable) / x.channels for x in scan.layers]
        width = 0.4 if probed else 0.8
        ax.bar([x - width / 2 if probed else x for x in xs], abnormal, width, label="abnormal %")
        if probed:
            ax.bar([x + width / 2 for x in xs], dead, width, label="dead %", color="tab:red")
        ax.set_title(f"{Path(scan.path).name} ({scan.architecture or 'unknown'})", fontsize=9)
        ax.set_ylabel("% of channels")
        ax.set_xlabel("BN layer (network order)")
        tallest = max([*abnormal, *(dead if probed else [])], default=0.0)
        ax.set_ylim(0, min(100.0, max(10.0, 1.15 * tallest)))
        ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    write_atomic(target, buffer.getvalue())
