"""The scan as the CLI and the demo run it: load inputs, build models, scan, in that order.

Everything that can fail on bad input (checkpoints, probe, architecture) is checked before
any output is written, so a failed run leaves no file behind.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import track

from bnfix.abri_keys import plain_view
from bnfix.architectures import is_builtin, recognise, stem_dimensions, stem_in_channels
from bnfix.checkpoint import Checkpoint, load_checkpoint
from bnfix.errors import BnfixError
from bnfix.loading import architecture, model_from_state, recorded_architecture
from bnfix.masks import Thresholds
from bnfix.models import closest_model
from bnfix.probe import (
    AudioOptions,
    ClipOptions,
    ImageOptions,
    Probe,
    adapt_channels,
    batches,
    load_probe,
)
from bnfix.scan import CheckpointScan, scan_probe, scan_static


@dataclass
class ScanRequest:
    checkpoints: list[Path]
    arch: str | None = None
    select: str | None = None
    modality: str | None = None
    probe: Path | None = None
    probe_limit: int = 128
    seed: int = 0  # which files a --probe-limit draws
    batch_size: int = 16
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    thresholds: Thresholds = Thresholds()
    audio: AudioOptions = AudioOptions()
    image: ImageOptions = ImageOptions()
    clip_frames: int = 16  # 3-D visual models: frames per clip
    clip_size: int | None = None  # 3-D visual models: crop (None: the architecture's preset)


class ProbeReader:
    """Reads the probe in the form each model takes, once per form.

    A 2-D model takes images (or spectrograms) one per sample; a 3-D model takes clips, one per
    folder of frames, with its architecture's preset. Several checkpoints of one scan share
    what was read.
    """

    def __init__(self, request: ScanRequest, console: Console | None = None) -> None:
        self.request, self.console = request, console
        self._read: dict[tuple, Probe] = {}

    def for_model(self, model: torch.nn.Module, arch: str | None) -> Probe:
        r = self.request
        clip = None
        if stem_dimensions(model) == 3 and r.modality != "audio":
            clip = ClipOptions.for_architecture(arch, frames=r.clip_frames, size=r.clip_size)
        key = (clip,)
        if key not in self._read:
            self._read[key] = self._load(clip)
        return self._read[key]

    def _load(self, clip: ClipOptions | None) -> Probe:
        r = self.request
        what = "clips" if clip is not None else "probe"
        status = self.console.status(f"reading {what} {r.probe}") if self.console else None
        with status or contextlib.nullcontext():
            probe = load_probe(
                r.probe, r.modality, r.probe_limit, r.audio, r.image, seed=r.seed, clip=clip
            )
        if self.console is not None:
            for source, reason in probe.skipped:
                self.console.print(
                    f"[yellow]skipped[/yellow] {escape(str(source))}: {escape(reason)}",
                    highlight=False,
                )
        return probe


class _Fixed(ProbeReader):
    """A probe already read (Python callers): every model gets it as it is."""

    def __init__(self, probe: Probe) -> None:
        self.probe = probe

    def for_model(self, model: torch.nn.Module, arch: str | None) -> Probe:
        return self.probe


def run_scan(request: ScanRequest, console: Console | None = None) -> list[CheckpointScan]:
    checkpoints = [load_checkpoint(p, request.select) for p in request.checkpoints]
    probe = None if request.probe is None else ProbeReader(request, console)
    return [scan_one(ckpt, probe, request, console) for ckpt in checkpoints]


def scan_one(
    ckpt: Checkpoint,
    probe: Probe | ProbeReader | None,
    request: ScanRequest,
    console: Console | None = None,
) -> CheckpointScan:
    """Static scan always; with a probe, the model is built and the probe run through it."""
    if probe is None:
        report = scan_static(ckpt, request.thresholds)
        report.modality = request.modality
        _name_architecture(report, ckpt, request)
        if request.modality:
            report.notes.append("no --probe given: static scan only")
        return report
    arch = architecture(ckpt, request.arch)
    if arch is None and recognise(plain_view(ckpt.state_dict)) is None:
        hint = _select_hint(ckpt)
        if hint:  # else build_model says what it could not recognise
            raise BnfixError("holds several models and a probe runs one" + hint, ckpt.path)
    model, recognition = model_from_state(ckpt.state_dict, arch)
    reader = probe if isinstance(probe, ProbeReader) else _Fixed(probe)
    probe = reader.for_model(model, recognition.name)
    x = adapt_channels(
        probe.tensor, stem_in_channels(model), str(request.probe), stem_dimensions(model)
    )
    chunks = batches(x, request.batch_size)
    if console is not None:  # a progress bar on the terminal; silent when piped
        chunks = track(chunks, f"probing {ckpt.path.name}", console=console, transient=True)
    report = scan_probe(
        ckpt,
        model,
        chunks,
        modality=probe.modality or request.modality,
        t=request.thresholds,
        device=request.device,
        probe_path=str(request.probe),
    )
    report.architecture = recognition.name
    report.notes.extend(recognition.notes)
    report.set_probe(str(request.probe), probe.files, probe.sources)
    if x.shape[1] != probe.tensor.shape[1]:
        report.notes.append(
            f"probe adapted from {probe.tensor.shape[1]} to {x.shape[1]} input channels"
        )
    return report


def _name_architecture(report: CheckpointScan, ckpt: Checkpoint, request: ScanRequest) -> None:
    """Say which architecture the checkpoint is, without running anyone's code.

    A static scan needs no model. A torchvision name (given or recorded) is checked against
    the keys, which builds nothing but meta tensors; a factory or timm name given with --arch
    is only recorded (it is built when a probe runs); a factory the file's metadata names is
    never imported.
    """
    recorded = recorded_architecture(ckpt)
    arch = request.arch or (recorded if recorded and is_builtin(recorded) else None)
    if recorded and arch is None:
        report.notes.append(
            f"the metadata names the factory {recorded!r}; not imported (bnfix never runs code "
            f"a file names): pass --arch {recorded} with --probe to use it"
        )
    if arch and (":" in arch):
        report.architecture = arch
        report.notes.append(f"{arch} not built: a static scan needs no model")
        return
    recognition = (
        model_from_state(ckpt.state_dict, arch)[1]
        if arch
        else recognise(plain_view(ckpt.state_dict))
    )
    if recognition is None:
        closest = closest_model(plain_view(ckpt.state_dict))
        near = f" (closest model {closest})" if closest else ""
        report.notes.append(
            f"architecture not recognised{near}: a probe scan needs --arch "
            "(a torchvision name, pkg.module:factory or timm:NAME)" + _select_hint(ckpt)
        )
    else:
        report.architecture = recognition.name
        report.notes.extend(recognition.notes)


def sub_models(state_dict: dict[str, torch.Tensor]) -> dict[str, str]:
    """Recognisable models under top-level prefixes, e.g. an audio-visual model's encoders.

    The paper's audio-visual checkpoints keep ``audio_net.*`` and ``visual_net.*`` side by
    side; neither is recognisable as a whole, each is on its own.
    """
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        head, dot, rest = key.partition(".")
        if dot:
            groups.setdefault(head + ".", {})[rest] = tensor
    if len(groups) > 8:  # a plain network's own top-level modules, not sub-models
        return {}
    found = {}
    for prefix, sub in groups.items():
        recognition = recognise(plain_view(sub)) if len(sub) >= 10 else None
        if recognition is not None:
            found[prefix] = recognition.name
    return found


def _select_hint(ckpt: Checkpoint) -> str:
    found = sub_models(ckpt.state_dict)
    if not found:
        return ""
    listed = ", ".join(f"{prefix} ({name})" for prefix, name in found.items())
    return f"; it holds {listed}: pass --select {next(iter(found))} to probe one"
