"""The scan as the CLI and the demo run it: load inputs, build models, scan, in that order.

Everything that can fail on bad input (checkpoints, probe, architecture) is checked before
any output is written, so a failed run leaves no file behind.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console

from bnfix.architectures import build_model, recognise, stem_in_channels
from bnfix.checkpoint import Checkpoint, load_checkpoint
from bnfix.masks import Thresholds
from bnfix.probe import AudioOptions, ImageOptions, Probe, adapt_channels, batches, load_probe
from bnfix.scan import CheckpointScan, scan_probe, scan_static


@dataclass
class ScanRequest:
    checkpoints: list[Path]
    arch: str | None = None
    select: str | None = None
    modality: str | None = None
    probe: Path | None = None
    probe_limit: int = 128
    batch_size: int = 16
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    thresholds: Thresholds = Thresholds()
    audio: AudioOptions = AudioOptions()
    image: ImageOptions = ImageOptions()


def run_scan(request: ScanRequest, console: Console) -> list[CheckpointScan]:
    checkpoints = [load_checkpoint(p, request.select) for p in request.checkpoints]
    probe = None
    if request.probe is not None:
        with console.status(f"reading probe {request.probe}"):
            probe = load_probe(
                request.probe,
                request.modality,
                limit=request.probe_limit,
                audio=request.audio,
                image=request.image,
            )
        for source, reason in probe.skipped:
            console.print(f"[yellow]skipped[/yellow] {source}: {reason}", highlight=False)
    scans = []
    for ckpt in checkpoints:
        with console.status(f"scanning {ckpt.path.name}"):
            scans.append(scan_one(ckpt, probe, request))
    return scans


def scan_one(ckpt: Checkpoint, probe: Probe | None, request: ScanRequest) -> CheckpointScan:
    """Static scan always; with a probe, the model is built and the probe run through it."""
    if probe is None:
        report = scan_static(ckpt, request.thresholds)
        report.modality = request.modality
        recognition = recognise(ckpt.state_dict)
        if recognition is None:
            report.notes.append(
                "architecture not recognised: a probe scan needs --arch "
                "(a torchvision name, pkg.module:factory or timm:NAME)"
            )
        else:
            report.architecture = recognition.name
            report.notes.extend(recognition.notes)
        if request.modality:
            report.notes.append("no --probe given: static scan only")
        return report
    model, recognition = build_model(ckpt.state_dict, request.arch)
    x = adapt_channels(probe.tensor, stem_in_channels(model), str(request.probe))
    report = scan_probe(
        ckpt,
        model,
        batches(x, request.batch_size),
        modality=probe.modality or request.modality,
        t=request.thresholds,
        device=request.device,
        probe_path=str(request.probe),
    )
    report.architecture = recognition.name
    report.notes.extend(recognition.notes)
    if x.shape[1] != probe.tensor.shape[1]:
        report.notes.append(
            f"probe adapted from {probe.tensor.shape[1]} to {x.shape[1]} input channels"
        )
    return report
