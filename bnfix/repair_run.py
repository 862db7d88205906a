"""``bnfix repair`` and ``bnfix fold`` as the CLI and the demo run them.

Order matters for trustworthiness: every input is read and checked, the work is done and
verified, and only then is the output written (atomically). A failure leaves no file.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import track

from bnfix import __version__
from bnfix.abri import PER_CHOICES, Per, abri_blocks, check_alpha, fold
from bnfix.abri_keys import is_abri
from bnfix.architectures import build_model, stem_in_channels
from bnfix.checkpoint import (
    Checkpoint,
    check_writable,
    load_checkpoint,
    save_checkpoint,
    sha256_file,
)
from bnfix.errors import BnfixError
from bnfix.loading import model_from_state
from bnfix.masks import Thresholds
from bnfix.probe import AudioOptions, ImageOptions, Probe, batches, load_probe
from bnfix.recalibrate import recalibrate
from bnfix.repair import STRATEGIES, RepairOutcome, apply_strategy
from bnfix.scan import CheckpointScan, scan_probe, scan_static
from bnfix.stem import MODALITY_CHANNELS, adapt_stem


@dataclass
class RepairRequest:
    checkpoint: Path
    modality: str
    strategy: str = "abri"
    alpha: float = 0.5
    per: Per = "layer"
    probe: Path | None = None
    probe_limit: int = 128
    batch_size: int = 16
    recalibrate: bool = False
    out: Path | None = None
    force: bool = False
    arch: str | None = None
    select: str | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    thresholds: Thresholds = Thresholds()
    audio: AudioOptions = AudioOptions()
    image: ImageOptions = ImageOptions()

    def __post_init__(self) -> None:  # str paths from Python callers, too
        self.checkpoint = Path(self.checkpoint)
        self.probe = None if self.probe is None else Path(self.probe)
        self.out = None if self.out is None else Path(self.out)


@dataclass
class RepairResult:
    out: Path
    before: CheckpointScan
    after: CheckpointScan
    outcome: RepairOutcome
    metadata: dict[str, str]
    model: torch.nn.Module  # the repaired model, as written (CPU, eval mode)


def default_output(checkpoint: Path, suffix: str) -> Path:
    return checkpoint.with_name(f"{checkpoint.stem}.{suffix}.safetensors")


def check_request(r: RepairRequest) -> None:
    """Everything that can be refused without reading a tensor."""
    if r.modality not in MODALITY_CHANNELS:
        raise BnfixError(f"--modality must be audio or visual, not {r.modality!r}")
    if r.strategy not in STRATEGIES:
        raise BnfixError(f"unknown strategy {r.strategy!r}; choose one of {', '.join(STRATEGIES)}")
    check_alpha(r.alpha)
    if r.per not in PER_CHOICES:
        raise BnfixError(f"--alpha-per must be layer or channel, not {r.per!r}")
    if r.recalibrate and r.probe is None:
        raise BnfixError("--recalibrate re-estimates statistics on the probe: pass --probe PATH")


def run_repair(r: RepairRequest, console: Console) -> RepairResult:
    check_request(r)
    out = r.out or default_output(r.checkpoint, r.strategy)
    inputs = (r.checkpoint, *([r.probe] if r.probe else []))
    check_writable(out, r.force, inputs)
    ckpt = load_checkpoint(r.checkpoint, r.select)
    if is_abri(ckpt.state_dict):
        raise BnfixError(
            "already holds ABRi blocks; repair its source checkpoint, or fold it first",
            r.checkpoint,
        )
    state = {k: v.clone() for k, v in ckpt.state_dict.items()}  # the model trains in place
    model, recognition = build_model(state, r.arch)
    stem = adapt_stem(model, MODALITY_CHANNELS[r.modality])
    probe = _read_probe(r, console)
    if probe is not None:
        _check_probe_shape(probe, r)

    def measure(model: torch.nn.Module, source: Checkpoint, label: str) -> CheckpointScan:
        if probe is None:
            report = scan_static(source, r.thresholds)
        else:
            chunks = batches(probe.tensor, r.batch_size)
            chunks = track(chunks, f"probing ({label})", console=console, transient=True)
            report = scan_probe(
                source,
                model,
                chunks,
                modality=r.modality,
                t=r.thresholds,
                device=r.device,
                probe_path=str(r.probe),
            )
        report.architecture = recognition.name
        return report

    before = measure(model, ckpt, "before")
    before.notes = list(ckpt.unwrapped) + list(recognition.notes)
    outcome = apply_strategy(model, r.strategy, r.alpha, r.per, r.thresholds)
    recalibrated = 0
    if r.recalibrate and probe is not None:
        model.to(r.device)
        recalibrated = recalibrate(model, batches(probe.tensor, r.batch_size), r.device)
    model.to("cpu").eval()
    repaired = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    metadata = {
        "bnfix_version": __version__,
        "bnfix_command": "repair",
        "source": str(r.checkpoint),
        "source_sha256": ckpt.sha256,
        "architecture": recognition.name,
        "in_channels": str(MODALITY_CHANNELS[r.modality]),
        "stem": stem or "unchanged",
        "strategy": r.strategy,
        "alpha": f"{r.alpha:g}" if r.strategy == "abri" else "",
        "alpha_per": r.per if r.strategy == "abri" else "",
        "modality": r.modality,
        "recalibrated": f"yes ({recalibrated} probe batches)" if recalibrated else "no",
        "probe": str(r.probe) if r.probe else "",
    }
    after_ckpt = Checkpoint(out, repaired, "", "safetensors", [], metadata)
    after = measure(model, after_ckpt, "after")
    after.notes = [_describe(outcome)] + ([f"stem {stem}"] if stem else [])
    if recalibrated:
        after.notes.append(f"running statistics recalibrated on {recalibrated} probe batches")
    save_checkpoint(repaired, out, metadata, force=r.force, inputs=inputs)
    after.sha256 = sha256_file(out)
    return RepairResult(out, before, after, outcome, metadata, model)


def _describe(outcome: RepairOutcome) -> str:
    if outcome.strategy == "abri":
        return f"ABRi: {outcome.layers} BN layers now pretrained BN + fresh twin, mixed by α"
    if outcome.strategy == "reset-dead":
        return f"reset γ=1, β=0 on {outcome.channels} flagged channels in {outcome.layers} layers"
    return f"reset all {outcome.layers} BN layers ({outcome.channels} channels) to defaults"


def _read_probe(r: RepairRequest, console: Console) -> Probe | None:
    if r.probe is None:
        return None
    with console.status(f"reading probe {r.probe}"):
        probe = load_probe(r.probe, r.modality, r.probe_limit, r.audio, r.image)
    for source, reason in probe.skipped:
        console.print(f"[yellow]skipped[/yellow] {source}: {reason}", highlight=False)
    return probe


def _check_probe_shape(probe: Probe, r: RepairRequest) -> None:
    channels = MODALITY_CHANNELS[r.modality]
    got = probe.tensor.shape[1]
    if got != channels:
        raise BnfixError(
            f"probe batches have {got} channels but --modality {r.modality} means {channels}; "
            "is this the other modality's data?",
            r.probe,
        )


# ------------------------------------------------------------------------------------ fold


@dataclass
class FoldResult:
    out: Path
    blocks: int
    max_deviation: float  # max |Δ| over the eval outputs, relative to their largest magnitude
    architecture: str
    metadata: dict[str, str]
    model: torch.nn.Module  # the folded model, as written (CPU, eval mode)


#: A fold is exact up to float32 rounding; anything above this means something is wrong.
FOLD_TOLERANCE = 1e-5


def run_fold(
    checkpoint: str | Path,
    out: str | Path,
    *,
    force: bool = False,
    arch: str | None = None,
    select: str | None = None,
    samples: int = 4,
    size: int = 64,
    seed: int = 0,
) -> FoldResult:
    checkpoint, out = Path(checkpoint), Path(out)
    check_writable(out, force, (checkpoint,))
    ckpt = load_checkpoint(checkpoint, select)
    if not is_abri(ckpt.state_dict):
        raise BnfixError(
            "not an ABRi-repaired checkpoint (no '<layer>.alpha' keys next to "
            "'<layer>.original.*'): nothing to fold",
            checkpoint,
        )
    model, recognition = model_from_state(
        ckpt.state_dict, arch or ckpt.metadata.get("architecture")
    )
    model.eval()
    folded = fold(copy.deepcopy(model))
    deviation = verify_fold(model, folded, stem_in_channels(model), samples, size, seed)
    if not deviation <= FOLD_TOLERANCE:
        raise BnfixError(
            f"folded model deviates by {deviation:.2e} of the output scale (> {FOLD_TOLERANCE:g}); "
            "not written",
            checkpoint,
        )
    metadata = dict(ckpt.metadata)
    metadata.update(
        {
            "bnfix_version": __version__,
            "bnfix_command": "fold",
            "folded_from": str(checkpoint),
            "folded_from_sha256": ckpt.sha256,
            "architecture": recognition.name,
            "in_channels": str(stem_in_channels(model)),
            "fold_max_deviation": f"{deviation:.3e}",
        }
    )
    state = {k: v.detach().cpu() for k, v in folded.state_dict().items()}
    save_checkpoint(state, out, metadata, force=force, inputs=(checkpoint,))
    blocks = len(abri_blocks(model))
    return FoldResult(out, blocks, deviation, recognition.name, metadata, folded)


def verify_fold(
    model: torch.nn.Module,
    folded: torch.nn.Module,
    in_channels: int,
    samples: int = 4,
    size: int = 64,
    seed: int = 0,
) -> float:
    """Max |Δ| between the two models' eval outputs on fresh random inputs, at output scale."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, in_channels, size, size, generator=g)
    with torch.inference_mode():
        want, got = model(x), folded(x)
    scale = float(want.abs().max()) or 1.0
    return float((got - want).abs().max()) / scale
