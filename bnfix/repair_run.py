"""``bnfix repair`` and ``bnfix fold`` as the CLI and the demo run them.

Order matters for trustworthiness: every input is read and checked, the work is done and
verified, and only then is the output written (atomically). A failure leaves no file.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import track

from bnfix import __version__
from bnfix.abri import PER_CHOICES, Per, abri_blocks, check_alpha, fold
from bnfix.abri_keys import ADDITIONAL, ALPHA, ORIGINAL, is_abri
from bnfix.architectures import build_model, stem_dimensions, stem_in_channels
from bnfix.checkpoint import (
    Checkpoint,
    check_writable,
    cpu_state_dict,
    load_checkpoint,
    save_checkpoint,
    sha256_file,
)
from bnfix.errors import BnfixError, one_line
from bnfix.loading import architecture, model_from_state
from bnfix.masks import Thresholds
from bnfix.probe import AudioOptions, ImageOptions, Probe, adapt_channels, batches
from bnfix.recalibrate import recalibrate
from bnfix.repair import STRATEGIES, RepairOutcome, apply_strategy
from bnfix.scan import CheckpointScan, scan_probe, scan_static
from bnfix.scan_run import ProbeReader, ScanRequest
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
    seed: int = 0  # which files a --probe-limit draws
    clip_frames: int = 16  # 3-D visual models: frames per clip
    clip_size: int | None = None  # 3-D visual models: crop (None: the architecture's preset)
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
    # The probe runs in float32 (scan_probe casts the model); what is written keeps the
    # checkpoint's own precision, tensor by tensor.
    source_dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    probe = _read_probe(r, console, model, recognition.name)
    if probe is not None:
        probe = _check_probe_shape(probe, r, model)

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
            report.set_probe(str(r.probe), probe.files, probe.sources)
        report.architecture = recognition.name
        return report

    # float64 does not survive the probe's float32 round trip as float16 does: such a model
    # is probed as a float32 copy, repaired and recalibrated in float64 itself.
    wide = torch.float64 in source_dtypes.values()
    before = measure(copy.deepcopy(model) if wide and probe is not None else model, ckpt, "before")
    before.notes = list(ckpt.unwrapped) + list(recognition.notes)
    outcome = apply_strategy(model, r.strategy, r.alpha, r.per, r.thresholds)
    recalibrated = 0
    if r.recalibrate and probe is not None:
        model.to(r.device, dtype=torch.float64 if wide else None)
        data = probe.tensor.to(torch.float64) if wide else probe.tensor
        recalibrated = recalibrate(model, batches(data, r.batch_size), r.device)
    model.to("cpu").eval()
    _restore_dtypes(model, source_dtypes, r.checkpoint)
    repaired = cpu_state_dict(model)
    precision = _float_dtypes(repaired)
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
        "dtype": precision,
    }
    after_ckpt = Checkpoint(out, repaired, "", "safetensors", [], metadata)
    # The probe scan casts its model to float32 in place; ``model`` is returned as written.
    half = probe is not None and precision != "float32"
    after = measure(copy.deepcopy(model) if half else model, after_ckpt, "after")
    after.notes = [_describe(outcome)] + ([f"stem {stem}"] if stem else [])
    if half:
        after.notes.append(f"probe run in float32; written as {precision}, the checkpoint's own")
    if recalibrated:
        after.notes.append(f"running statistics recalibrated on {recalibrated} probe batches")
    save_checkpoint(repaired, out, metadata, force=r.force, inputs=inputs)
    after.sha256 = sha256_file(out)
    return RepairResult(out, before, after, outcome, metadata, model)


def _describe(outcome: RepairOutcome) -> str:
    if outcome.strategy == "abri":
        text = f"ABRi: {outcome.layers} BN layers now pretrained BN + fresh twin, mixed by α"
        if outcome.skipped:
            first, why = next(iter(outcome.skipped.items()))
            text += f"; {len(outcome.skipped)} left as they were (e.g. {first}: {why})"
        return text
    if outcome.strategy == "keep":
        return "BN layers kept as they were (no strategy applied)"
    if outcome.strategy == "reset-dead":
        return f"reset γ=1, β=0 on {outcome.channels} flagged channels in {outcome.layers} layers"
    return f"reset all {outcome.layers} BN layers ({outcome.channels} channels) to defaults"


def _source_key(key: str) -> str:
    """The key of a repaired tensor before repair: an ABRi block's tensors come from its BN."""
    parts = key.split(".")
    inner = [i for i, part in enumerate(parts[:-1]) if part in (ORIGINAL, ADDITIONAL) and i > 0]
    if inner:  # P.original.weight, and below it: P.original.act.weight (timm BatchNormAct2d)
        return ".".join(parts[: inner[-1]] + parts[inner[-1] + 1 :])
    if len(parts) >= 2 and parts[-1] == ALPHA:
        return ".".join([*parts[:-1], "weight"])
    return key


def _restore_dtypes(
    model: torch.nn.Module, dtypes: dict[str, torch.dtype], source: Path | None = None
) -> None:
    """Cast every floating tensor of ``model`` back to the dtype its source tensor had.

    Float16/bfloat16 → float32 → back is exact, so untouched tensors stay bit-exact; new ones
    (an ABRi twin, α, recalibrated statistics) take their BN's precision. A value the source
    precision cannot hold (a recalibrated variance beyond float16's range) is refused.
    """
    for module_name, module in model.named_modules():
        for kind in ("_parameters", "_buffers"):
            for leaf, tensor in getattr(module, kind).items():
                if tensor is None or not tensor.is_floating_point():
                    continue
                key = f"{module_name}.{leaf}" if module_name else leaf
                dtype = dtypes.get(key, dtypes.get(_source_key(key)))
                if dtype is None or not dtype.is_floating_point or dtype == tensor.dtype:
                    continue
                with torch.no_grad():
                    cast = tensor.detach().to(dtype)
                    top = float(tensor.detach().abs().amax()) if tensor.numel() else 0.0
                if torch.finfo(dtype).max < top < math.inf:  # finite here, inf when written
                    name = str(dtype).removeprefix("torch.")
                    raise BnfixError(
                        f"{key} holds values ({top:.3g}) beyond the range of {name}, the "
                        "checkpoint's precision; not written (repair a float32 copy to keep them)",
                        source,
                    )
                if kind == "_parameters":
                    tensor.data = cast
                else:
                    module._buffers[leaf] = cast


def _float_dtypes(state: dict[str, torch.Tensor]) -> str:
    names = {str(v.dtype).removeprefix("torch.") for v in state.values() if v.is_floating_point()}
    return ", ".join(sorted(names)) or "none"


def _read_probe(
    r: RepairRequest, console: Console, model: torch.nn.Module, arch: str
) -> Probe | None:
    """The probe in the form the model takes (clips for a 3-D stem), as ``scan`` reads it."""
    if r.probe is None:
        return None
    request = ScanRequest(
        [r.checkpoint],
        modality=r.modality,
        probe=r.probe,
        probe_limit=r.probe_limit,
        seed=r.seed,
        audio=r.audio,
        image=r.image,
        clip_frames=r.clip_frames,
        clip_size=r.clip_size,
    )
    return ProbeReader(request, console).for_model(model, arch)


def _check_probe_shape(probe: Probe, r: RepairRequest, model: torch.nn.Module) -> Probe:
    """The probe in the stem's rank (a saved ``[N, 1, samples]`` wave reads as 4-D, which
    scan takes for a Conv1d and repair refused), with the modality's channel count."""
    tensor = adapt_channels(
        probe.tensor, probe.tensor.shape[1], str(r.probe), stem_dimensions(model)
    )
    channels = MODALITY_CHANNELS[r.modality]
    got = probe.tensor.shape[1]
    if got != channels:
        raise BnfixError(
            f"probe batches have {got} channels but --modality {r.modality} means {channels}; "
            "is this the other modality's data?",
            r.probe,
        )
    return replace(probe, tensor=tensor)


# ------------------------------------------------------------------------------------ fold


@dataclass
class FoldResult:
    out: Path
    blocks: int
    max_deviation: float  # max |Δ| over the eval outputs, relative to their largest magnitude
    architecture: str
    metadata: dict[str, str]
    model: torch.nn.Module  # the folded model, as written (CPU, eval mode)
    check: FoldCheck | None = None  # how the fold was verified

    @property
    def verification(self) -> str:
        """One line saying how the fold was checked (for the CLI and the demo)."""
        return "" if self.check is None else self.check.describe()


@dataclass
class FoldCheck:
    """The fold's self-check: both models in eval mode on the same random inputs."""

    deviation: float  # the fold maths: float64 copies of the ABRi model and of its fold
    written_deviation: float  # the folded model as written (its own dtype), run in float32
    shape: tuple[int, ...]  # the random input that was used
    dtype: str  # the written model's floating dtype(s)

    def describe(self) -> str:
        shape = "×".join(map(str, self.shape))
        text = f"verified in eval mode, in float64, on random {shape} inputs"
        if self.dtype != "float32":
            text += (
                f"; written as {self.dtype}, whose rounding moves the outputs by "
                f"{self.written_deviation:.2e} of the output scale"
            )
        return text


#: A fold is exact (checked in float64, where it is 1e-10 at worst); anything above this
#: means something is wrong.
FOLD_TOLERANCE = 1e-5
#: Square input sizes the fold's self-check tries, smallest first: the first one the model
#: runs on is used (64 suits most CNNs; Inception-v3 needs at least 75).
VERIFY_SIZES: tuple[int, ...] = (64, 96, 128, 224, 299)


def run_fold(
    checkpoint: str | Path,
    out: str | Path,
    *,
    force: bool = False,
    arch: str | None = None,
    select: str | None = None,
    samples: int = 4,
    sizes: Sequence[int] = VERIFY_SIZES,
    seed: int = 0,
) -> FoldResult:
    """Fold ``checkpoint``'s ABRi blocks into plain BatchNorm and write ``out``.

    The folded checkpoint keeps the checkpoint's own dtype (float16 in, float16 out). The fold
    is verified in float64 on float64 copies of both models, against :data:`FOLD_TOLERANCE`;
    what the written model gives in float32 (its rounding to a half-precision dtype, and
    float32 arithmetic) is measured too and recorded (``fold_written_deviation``), not held
    against the fold.
    """
    checkpoint, out = Path(checkpoint), Path(out)
    check_writable(out, force, (checkpoint,))
    ckpt = load_checkpoint(checkpoint, select)
    if not is_abri(ckpt.state_dict):
        raise BnfixError(
            "not an ABRi-repaired checkpoint (no '<layer>.alpha' keys next to "
            "'<layer>.original.*'): nothing to fold",
            checkpoint,
        )
    model, recognition = model_from_state(ckpt.state_dict, architecture(ckpt, arch))
    model.eval()
    folded = fold(_shared_copy(model))  # in the checkpoint's own dtype: what is written
    try:
        check = verify_fold(model, folded, stem_in_channels(model), samples, sizes, seed)
    except BnfixError as exc:
        raise BnfixError(f"{exc}; not written", checkpoint) from None
    if not check.deviation <= FOLD_TOLERANCE:
        raise BnfixError(
            f"folded model deviates by {check.deviation:.2e} of the output scale "
            f"(> {FOLD_TOLERANCE:g}); not written",
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
            "fold_max_deviation": f"{check.deviation:.3e}",
            "fold_verified": check.describe(),
            "fold_written_deviation": f"{check.written_deviation:.3e}",
            "dtype": check.dtype,
        }
    )
    state = cpu_state_dict(folded)
    save_checkpoint(state, out, metadata, force=force, inputs=(checkpoint,))
    blocks = len(abri_blocks(model))
    return FoldResult(
        out, blocks, check.deviation, recognition.name, metadata, folded.eval(), check
    )


def verify_fold(
    model: torch.nn.Module,
    folded: torch.nn.Module,
    in_channels: int,
    samples: int = 4,
    sizes: Sequence[int] = VERIFY_SIZES,
    seed: int = 0,
) -> FoldCheck:
    """Compare the two models' eval outputs on random inputs, max |Δ| at output scale.

    The fold maths are checked in float64, on a float64 copy of the ABRi model and its fold:
    in float32 an ill-conditioned network's own rounding is larger than any fold error
    (timm's mixnet_s, with statistics recalibrated on a small probe, runs 5e-3 off its float64
    outputs, and a correct fold was refused). The model as written, run in float32 as it will
    be, is measured against the same float64 reference and recorded. Neither argument is
    changed; the first of ``sizes`` the model accepts is used. Outputs may be tensors or
    tuples, lists, named tuples and dicts of them (GoogLeNet/Inception with auxiliary heads,
    multi-head models): every tensor is compared.
    """
    dtype = _float_dtypes(folded.state_dict())
    exact = copy.deepcopy(model).double().eval()
    x, want = _first_run(exact, in_channels, samples, sizes, seed)
    written = _shared_copy(folded) if dtype == "float32" else copy.deepcopy(folded).float()
    written.eval()
    with torch.inference_mode():
        deviation = _deviation(want, fold(_shared_copy(exact))(x))
        written_deviation = _deviation(want, written(x.float()))
    return FoldCheck(deviation, written_deviation, tuple(x.shape), dtype)


def _shared_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of the module tree that shares every parameter and buffer with ``model``.

    Enough wherever modules are replaced or switched to eval, not tensors written: ``fold``
    builds new BatchNorms and only reads the blocks' tensors. Copying a large model's tensors
    costs seconds; this costs the module objects only.
    """
    memo: dict[int, object] = {id(t): t for t in model.parameters()}
    memo.update({id(t): t for t in model.buffers()})
    return copy.deepcopy(model, memo)


def _first_run(
    model: torch.nn.Module, in_channels: int, samples: int, sizes: Sequence[int], seed: int
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The first random input the model runs on, and its output: ``[samples, in_channels, S, S]``
    for a 2-D stem, ``[..., T, S, S]`` for a 3-D one (8 frames, else 16: s3d pools over 2 of
    its 8-times-shorter time axis), ``[..., S·S]`` for a 1-D one; in the model's dtype."""
    failure = ""
    dims = stem_dimensions(model)
    dtype = next((t.dtype for t in model.parameters() if t.is_floating_point()), torch.float32)
    extents = [
        extent
        for size in sizes
        for extent in {1: [(size * size,)], 3: [(8, size, size), (16, size, size)]}.get(
            dims, [(size, size)]
        )
    ]
    for extent in extents:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(samples, in_channels, *extent, generator=g).to(dtype)
        try:
            with torch.inference_mode():
                out = model(x)
        except Exception as exc:  # too small for its pooling, a fixed input size, ...
            failure = one_line(exc, 160)
            continue
        tensors = _output_tensors(out)
        if not tensors:
            raise BnfixError(
                f"cannot verify the fold: the model's output ({type(out).__name__}) holds no "
                "floating-point tensor"
            )
        if not all(bool(torch.isfinite(t).all()) for t in tensors):
            raise BnfixError(
                "cannot verify the fold: the model's outputs on random inputs are not finite "
                "(NaN or infinite weights?)"
            )
        return x, tensors
    tried = ", ".join(map(str, sizes))
    raise BnfixError(
        f"cannot verify the fold: the model runs on no random [{samples}, {in_channels}, …] "
        f"input with S in {tried} (at S={sizes[-1] if sizes else '?'}: {failure or 'no size'})"
    )


def _output_tensors(out: object) -> list[torch.Tensor]:
    """The floating-point tensors in a model's output, in a fixed order."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _output_tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _output_tensors(v)]
    return []


def _deviation(want: list[torch.Tensor], got_out: object) -> float:
    got = _output_tensors(got_out)
    if len(got) != len(want) or any(a.shape != b.shape for a, b in zip(got, want, strict=True)):
        return float("inf")  # a different output structure cannot be the same model
    scale = max(float(w.abs().max()) if w.numel() else 0.0 for w in want) or 1.0
    diffs = [float((g - w).abs().max()) for g, w in zip(got, want, strict=True) if w.numel()]
    return max(diffs, default=0.0) / scale
