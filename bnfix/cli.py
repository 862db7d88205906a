"""The ``bnfix`` command line: a thin click layer over the library.

Every user-fixable problem is a :class:`BnfixError` (or a click usage error) and becomes one
line on stderr with exit code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.console import Console

from bnfix import __version__
from bnfix.errors import BnfixError, one_line
from bnfix.thresholds import Thresholds

if TYPE_CHECKING:
    import torch

    from bnfix.repair_run import RepairResult

MODALITIES = click.Choice(["audio", "visual"])


class FiniteRange(click.ParamType):
    """A finite number in ``[low, high]``. ``click.FloatRange`` lets NaN through (every
    comparison with NaN is false), and a NaN tolerance or threshold silently switches its test
    off: ``--fail-on nan`` would never fail."""

    name = "number"

    def __init__(self, low: float = 0.0, high: float = float("inf")) -> None:
        self.low, self.high = low, high

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None):
        try:
            number = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not (self.low <= number <= self.high and abs(number) != float("inf")):
            upper = "" if self.high == float("inf") else f" and ≤ {self.high:g}"
            self.fail(f"{value!r} must be a finite number ≥ {self.low:g}{upper}", param, ctx)
        return number


TOLERANCE = FiniteRange()
SEED_HELP = "Which probe files --probe-limit draws (uniformly at random, spread over folders)."
#: torch's and numpy's generators take a 64-bit seed; a larger one was a traceback.
SEED = click.IntRange(0, 2**63 - 1)
FRACTION = FiniteRange(0.0, 1.0)


def resolve_device(name: str) -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise BnfixError("--device cuda: no CUDA device is available here; use --device cpu")
    return torch.device(name)


def make_console(stderr: bool = False) -> Console:
    """A console for reports; piped output gets a width that fits the table, not 80 columns."""
    console = Console(stderr=stderr)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(stderr=stderr, width=150)
    return console


def check_output(
    path: Path,
    suffix: str | None,
    inputs: list[Path],
    option: str,
    *,
    force: bool = True,
    others: tuple[tuple[str, Path], ...] = (),
) -> None:
    """Refuse an output before any work is done, so a bad one never costs a scan: a file of
    another kind, ``-`` (outputs are files), a folder, one that is missing or not writable, an
    input or anything inside an input folder (a plot written into the probe folder would be
    read as a probe sample next time), another output of the same command (``others``), or
    an existing file without ``force``."""
    if str(path) == "-":
        raise BnfixError(f"{option} -: this output is a file, not standard output; name one")
    if suffix and path.suffix.lower() != suffix:
        raise BnfixError(f"{option} must name a {suffix} file", path)
    if path.is_dir():
        raise BnfixError(f"{option} is a folder; name a file in it", path)
    if not path.parent.is_dir():
        raise BnfixError(f"{option}: folder {path.parent} does not exist", path)
    if not os.access(path.parent, os.W_OK):
        raise BnfixError(f"{option}: cannot write in folder {path.parent}", path)
    target = path.resolve()
    for given in inputs:
        source = given.resolve()
        if target == source:
            raise BnfixError(f"{option} would overwrite an input file; pick another name", path)
        if source.is_dir() and target.is_relative_to(source):
            raise BnfixError(
                f"{option} is inside the input folder {given}, whose files are read as "
                "input; write it elsewhere",
                path,
            )
    for name, other in others:
        if target == other.resolve():
            raise BnfixError(f"{option} and {name} name the same file", path)
    if not force and path.exists():
        raise BnfixError(f"{option}: exists; pass --force to replace it", path)


_PROBE_OPTIONS = [
    click.option(
        "--sample-rate",
        default=16000,
        show_default=True,
        type=click.IntRange(1000, 384000),
        help="Audio probe: resample to this rate.",
    ),
    click.option(
        "--mel-bins",
        default=128,
        show_default=True,
        type=click.IntRange(4, 512),
        help="Audio probe: Kaldi fbank mel bins.",
    ),
    click.option(
        "--frames",
        default=1024,
        show_default=True,
        type=click.IntRange(1, 360000),
        help="Audio probe: pad or crop to this many 10 ms frames.",
    ),
    click.option("--audio-mean", type=float, help="Audio probe: normalisation mean [probe's own]."),
    click.option("--audio-std", type=float, help="Audio probe: normalisation std [probe's own]."),
    click.option(
        "--image-size",
        default=224,
        show_default=True,
        type=click.IntRange(8, 4096),
        help="Visual probe: centre-crop size (resize to 8/7 of it first).",
    ),
    click.option(
        "--audio-input",
        default="fbank",
        show_default=True,
        type=click.Choice(["fbank", "waveform"]),
        help="Audio probe: Kaldi fbank [N,1,frames,mels], or the raw wave [N,1,samples] "
        "for 1-D models.",
    ),
    click.option(
        "--seconds",
        default=1.0,
        show_default=True,
        type=FiniteRange(1e-3, 3600.0),
        help="Waveform probe: pad or crop every clip to this length.",
    ),
    click.option(
        "--clip-frames",
        default=16,
        show_default=True,
        type=click.IntRange(1, 1024),
        help="3-D visual models: frames per clip (one clip per folder of frames or per video).",
    ),
    click.option(
        "--clip-size",
        type=click.IntRange(8, 4096),
        help="3-D visual models: crop size [the architecture's Kinetics preset, e.g. 112].",
    ),
]


def probe_options(f: Callable) -> Callable:
    """The audio and image transform options, shared by every command that reads a probe."""
    for option in reversed(_PROBE_OPTIONS):
        f = option(f)
    return f


def probe_transforms(
    sample_rate: int,
    mel_bins: int,
    frames: int,
    audio_mean: float | None,
    audio_std: float | None,
    image_size: int,
    audio_input: str = "fbank",
    seconds: float = 1.0,
    clip_frames: int = 16,
    clip_size: int | None = None,
) -> dict[str, object]:
    from bnfix.probe import AudioOptions, ImageOptions

    return {
        "audio": AudioOptions(
            sample_rate=sample_rate,
            num_mel_bins=mel_bins,
            target_frames=frames,
            mean=audio_mean,
            std=audio_std,
            input=audio_input,
            seconds=seconds,
        ),
        "image": ImageOptions(size=image_size, resize=round(image_size * 8 / 7)),
        "clip_frames": clip_frames,
        "clip_size": clip_size,
    }


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="bnfix")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Find and repair dead BatchNorm channels in pretrained CNN checkpoints."""
    ctx.obj = {"debug": debug}


@cli.command()
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--arch", help="torchvision name, pkg.module:factory or timm:NAME (probe only).")
@click.option("--select", help="Scan only keys under this prefix (e.g. audio_net.).")
@click.option("--modality", type=MODALITIES, help="What the probe holds.")
@click.option(
    "--probe",
    type=click.Path(path_type=Path),
    help="Audio, video, image or tensor file, or a folder of them.",
)
@click.option("--probe-limit", default=128, show_default=True, type=click.IntRange(2))
@click.option("--seed", default=0, show_default=True, type=SEED, help=SEED_HELP)
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(2))
@click.option("--json", "json_out", metavar="FILE|-", help="Write the report as JSON.")
@click.option("--plot", type=click.Path(path_type=Path), help="Write per-layer bars (PNG).")
@click.option("--force", is_flag=True, help="Replace an existing --json or --plot file.")
@click.option(
    "--fail-on",
    type=FRACTION,
    metavar="FRACTION",
    help="Exit 1 when dead + always-dead channels exceed this share.",
)
@click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]))
@click.option(
    "--abs-tol",
    default=Thresholds.abs_tol,
    show_default=True,
    type=TOLERANCE,
    help="|γ| and |β| below this: abnormal pair.",
)
@click.option(
    "--rel-tol",
    default=Thresholds.rel_tol,
    show_default=True,
    type=TOLERANCE,
    help="... or below this share of the layer's median.",
)
@click.option(
    "--var-tol",
    default=Thresholds.var_tol,
    show_default=True,
    type=TOLERANCE,
    help="Running variance below this: collapsed channel.",
)
@click.option(
    "--dead-fraction",
    default=Thresholds.dead_fraction,
    show_default=True,
    type=FRACTION,
    help="Dead: ≤ 0 on at least this share of samples.",
)
@probe_options
def scan(
    checkpoints: tuple[Path, ...],
    arch: str | None,
    select: str | None,
    modality: str | None,
    probe: Path | None,
    probe_limit: int,
    seed: int,
    batch_size: int,
    json_out: str | None,
    plot: Path | None,
    force: bool,
    fail_on: float | None,
    device: str,
    abs_tol: float,
    rel_tol: float,
    var_tol: float,
    dead_fraction: float,
    **probe_settings: object,
) -> None:
    """Find dead BatchNorm channels in one or more checkpoints (shown side by side)."""
    from bnfix.scan_run import ScanRequest, run_scan

    inputs = list(checkpoints) + ([probe] if probe else [])
    if json_out and json_out != "-":
        check_output(Path(json_out), ".json", inputs, "--json", force=force)
    if plot:
        check_output(plot, ".png", inputs, "--plot", force=force)
    request = ScanRequest(
        checkpoints=list(checkpoints),
        arch=arch,
        select=select,
        modality=modality,
        probe=probe,
        probe_limit=probe_limit,
        seed=seed,
        batch_size=batch_size,
        device=resolve_device(device),
        thresholds=Thresholds(abs_tol, rel_tol, var_tol, dead_fraction),
        **probe_transforms(**probe_settings),
    )
    console = make_console(stderr=json_out == "-")
    scans = run_scan(request, console)
    again = _for_repair(click.get_current_context())
    for s in scans:
        s.repeat = again
    _emit(scans, console, json_out, plot)
    if fail_on is not None:
        crossed = [s for s in scans if s.unusable_fraction > fail_on]
        for s in crossed:
            console.print(
                f"[red]fail-on:[/red] {s.path}: {s.unusable_fraction:.1%} of channels dead "
                f"> {fail_on:.1%}",
                highlight=False,
            )
        if crossed:
            sys.exit(1)


#: scan options repair takes too that the recommended command must not repeat: it names
#: the probe and modality itself, and outputs and the device are the scan's own business.
_NOT_REPEATED = frozenset({"probe", "modality", "json_out", "force", "device"})


def _for_repair(ctx: click.Context) -> list[str]:
    """``--option value`` for every scan option given on the command line that ``repair``
    takes too (``--select``, ``--arch``, the probe's features...): repeated in the repair a
    scan recommends, so it repairs the same sub-model and recalibrates on the same features."""
    from click.core import ParameterSource

    shared = {p.name for p in repair.params} - _NOT_REPEATED
    args: list[str] = []
    for param in ctx.command.params:
        given = ctx.get_parameter_source(param.name) is ParameterSource.COMMANDLINE
        if param.name in shared and given:
            args += [param.opts[0], str(ctx.params[param.name])]
    return args


def _emit(scans: list, console: Console, json_out: str | None, plot: Path | None) -> None:
    from bnfix import report

    report.render(scans, console)
    if json_out:
        report.write_json(scans, json_out, Console(file=sys.stdout))
        if json_out != "-":
            console.print(f"wrote {json_out}", highlight=False, markup=False)
    if plot:
        report.plot(scans, plot)
        console.print(f"wrote {plot}", highlight=False, markup=False)


@cli.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--modality", type=MODALITIES, required=True, help="What the model will now see.")
@click.option(
    "--strategy",
    default="abri",
    show_default=True,
    type=click.Choice(["abri", "reset-dead", "reset-all", "keep"]),
    help="abri: add a fresh BN twin mixed by α; reset-dead: γ=1, β=0 on flagged channels; "
    "reset-all: every BN to defaults; keep: no BN change (with --recalibrate: AdaBN only).",
)
@click.option(
    "--alpha",
    default=0.5,
    show_default=True,
    type=FRACTION,
    help="ABRi: initial weight of the pretrained BN.",
)
@click.option(
    "--alpha-per",
    default="layer",
    show_default=True,
    type=click.Choice(["layer", "channel"]),
    help="ABRi: one α per layer or per channel.",
)
@click.option(
    "--probe",
    type=click.Path(path_type=Path),
    help="Target-modality data: scan before/after on it (and --recalibrate).",
)
@click.option("--probe-limit", default=128, show_default=True, type=click.IntRange(2))
@click.option("--seed", default=0, show_default=True, type=SEED, help=SEED_HELP)
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(2))
@click.option("--recalibrate", is_flag=True, help="Re-estimate running statistics on the probe.")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    help="Output file (.safetensors, or .pt) [CKPT.STRATEGY.safetensors].",
)
@click.option("--force", is_flag=True, help="Replace an existing --out.")
@click.option("--arch", help="torchvision name, pkg.module:factory or timm:NAME.")
@click.option("--select", help="Repair only keys under this prefix (e.g. audio_net.).")
@click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--json", "json_out", metavar="FILE|-", help="Write both scans as JSON.")
@probe_options
def repair(
    checkpoint: Path,
    modality: str,
    strategy: str,
    alpha: float,
    alpha_per: str,
    probe: Path | None,
    probe_limit: int,
    seed: int,
    batch_size: int,
    recalibrate: bool,
    out: Path | None,
    force: bool,
    arch: str | None,
    select: str | None,
    device: str,
    json_out: str | None,
    **probe_settings: object,
) -> None:
    """Repair dead BN channels for another modality; writes a new checkpoint, never the input."""
    from bnfix.repair_run import RepairRequest, default_output, run_repair

    inputs = [checkpoint] + ([probe] if probe else [])
    written = out if out is not None else default_output(checkpoint, strategy)
    if out is not None:
        check_output(out, None, inputs, "--out")  # an existing one: refused later unless --force
    if json_out and json_out != "-":
        others = (("--out" if out is not None else "the default output", written),)
        check_output(Path(json_out), ".json", inputs, "--json", force=force, others=others)
    request = RepairRequest(
        checkpoint=checkpoint,
        modality=modality,
        strategy=strategy,
        alpha=alpha,
        per=alpha_per,  # type: ignore[arg-type]
        probe=probe,
        probe_limit=probe_limit,
        seed=seed,
        batch_size=batch_size,
        recalibrate=recalibrate,
        out=out,
        force=force,
        arch=arch,
        select=select,
        device=resolve_device(device),
        **probe_transforms(**probe_settings),
    )
    console = make_console(stderr=json_out == "-")
    result = run_repair(request, console)
    show_repair(result, console)
    if json_out:
        from bnfix import report

        report.write_json([result.before, result.after], json_out, Console(file=sys.stdout))


def show_repair(result: RepairResult, console: Console) -> None:
    from bnfix import report

    report.render(
        [result.before, result.after],
        console,
        labels=("before", "after"),
        show_recommendation=False,
    )
    console.print(f"wrote {result.out}", highlight=False, markup=False)


@cli.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output file.")
@click.option("--force", is_flag=True, help="Replace an existing --out.")
@click.option("--arch", help="Architecture, when the checkpoint's metadata does not name it.")
@click.option("--select", help="Fold only keys under this prefix (e.g. audio_net.).")
def fold(checkpoint: Path, out: Path, force: bool, arch: str | None, select: str | None) -> None:
    """Collapse ABRi blocks into each layer's own BatchNorm class, for the stock model."""
    from bnfix.repair_run import run_fold

    check_output(out, None, [checkpoint], "--out")
    result = run_fold(checkpoint, out, force=force, arch=arch, select=select)
    console = make_console()
    console.print(
        f"folded {result.blocks} ABRi blocks of {checkpoint.name} ({result.architecture}) into "
        f"each layer's own BatchNorm; max eval-mode deviation on random inputs "
        f"{result.max_deviation:.2e} of the output scale",
        highlight=False,
    )
    if result.verification:
        console.print(f"  {result.verification}", highlight=False)
    console.print(f"wrote {result.out}", highlight=False, markup=False)


@cli.command()
@click.option(
    "--workdir",
    default="bnfix-demo",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
)
@click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]))
def demo(workdir: Path, device: str) -> None:
    """The whole flow on the built-in default (torchvision's ImageNet MobileNetV2)."""
    from bnfix.demo import run_demo

    run_demo(workdir, resolve_device(device), make_console())


from bnfix.recipes import FORMATS as RECIPE_FORMATS  # noqa: E402  (light: names, csv, rich)


@cli.command("manifest")
@click.argument("fmt", metavar="FORMAT", type=click.Choice(list(RECIPE_FORMATS)))
@click.argument("root", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), help="Manifest CSV [ROOT/manifest.csv].")
@click.option("--absolute", is_flag=True, help="Write absolute paths (default: relative to --out).")
@click.option("--strict", is_flag=True, help="Listed clips without their files are an error.")
@click.option("--force", is_flag=True, help="Replace an existing --out.")
@click.option(
    "--labels",
    type=click.Path(path_type=Path),
    help="ks: a folder of train/val/test .txt or .csv lists, or one CSV id,label,split.",
)
@click.option("--seed", type=SEED, help="cremad: which actors go to which split [0].")
@click.option("--ratios", help="cremad: train,val,test shares of the actors [0.7,0.1,0.2].")
@click.option(
    "--videos",
    type=click.Path(path_type=Path),
    help="ave, vggsound: the folder of videos [ROOT/AVE; ROOT and ROOT/video].",
)
def manifest(
    fmt: str,
    root: Path,
    out: Path | None,
    absolute: bool,
    strict: bool,
    force: bool,
    **options: object,
) -> None:
    """Write a fusion manifest for a dataset in its public layout (ks, cremad, ave, vggsound,
    folders); see the README's "Dataset recipes"."""
    from bnfix.recipes import build, check_out, report, write_manifest

    out = out if out is not None else root / "manifest.csv"
    if str(out) == "-":
        raise BnfixError("--out -: the manifest is a file, not standard output; name one")
    check_out(out, force)  # before the scan: a refusal should cost nothing
    given = {k: v for k, v in options.items() if v is not None}
    recipe = build(fmt, root, strict=strict, **given)
    check_out(out, force, recipe)  # now that the dataset's own files are known
    console = make_console()
    report(recipe, console)
    write_manifest(recipe, out, absolute=absolute, force=force)
    console.print(f"wrote {out}", highlight=False, markup=False)


from bnfix.fusion.command import fusion_tune  # noqa: E402  (registered after the group exists)

cli.add_command(fusion_tune)


def _debug(args: list[str]) -> bool:
    """``bnfix --debug CMD ...`` (the group's option, before the command) or BNFIX_DEBUG=1."""
    before = next((i for i, a in enumerate(args) if not a.startswith("-")), len(args))
    return "--debug" in args[:before] or os.environ.get("BNFIX_DEBUG") == "1"


_MAIN_PID: list[int] = []  # the process main() installed the SIGTERM handler in


def _terminated(signum: int, _frame: object) -> None:
    """SIGTERM ends the run as an exception would, so an output being written is removed
    (the default action killed the process mid-write, leaving a full-size temp file).

    Only in bnfix's own process: a forked worker inherits the handler, and a pool that stops
    its workers with SIGTERM must see them die (a process-pool worker turns an exception in
    its job into a result and waits for the next, and the pool then waited for good)."""
    if os.getpid() not in _MAIN_PID:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    raise SystemExit(128 + signum)


def _out_of_memory(exc: BaseException) -> bool:
    text = str(exc)
    allocation = "can't allocate memory" in text or "out of memory" in text
    return isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and allocation)


def main(argv: list[str] | None = None) -> None:
    """Entry point: one line and exit 2 for bad input; --debug adds the traceback (and still
    exits 2, so scripts see the same code)."""
    args = sys.argv[1:] if argv is None else argv
    debug = _debug(args)
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        _MAIN_PID[:] = [os.getpid()]
        signal.signal(signal.SIGTERM, _terminated)
    try:
        cli.main(args=args, prog_name="bnfix", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except (click.Abort, KeyboardInterrupt):
        print("bnfix: interrupted", file=sys.stderr)
        sys.exit(130)
    except click.ClickException as exc:
        if debug:
            traceback.print_exc()
        hint = ""
        ctx = getattr(exc, "ctx", None)
        if ctx is not None:
            hint = f" (see '{ctx.command_path} --help')"
        print(f"bnfix: error: {exc.format_message()}{hint}", file=sys.stderr)
        sys.exit(2)
    except BnfixError as exc:
        if debug:
            traceback.print_exc()
        print(f"bnfix: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except (MemoryError, RuntimeError) as exc:
        if not _out_of_memory(exc):
            raise
        if debug:
            traceback.print_exc()
        print(
            f"bnfix: error: out of memory ({one_line(exc, limit=120)}); use a smaller probe "
            "(--probe-limit, --batch-size, --image-size, --frames)",
            file=sys.stderr,
        )
        sys.exit(2)
