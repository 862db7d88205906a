"""What ABRi costs per training step and per eval forward against plain BN, measured in one run.

Four copies of one model (same initial weights) differ only in their BatchNorm layers: plain
BN, the paper's naive two-BN ABRi (``after(α·bn1(x) + (1−α)·bn2(x))``, written below), and
bnfix's one-pass ABRi from :func:`bnfix.abri.convert` with α per layer and per channel.
``--model`` picks the model: ``resnet18`` (default; stem conv1 takes the 1-channel spectrograms
[B, 1, T, F] that bnfix meets in audio, ``--input CxTxF``), timm's ``efficientnet_b0``
(BatchNormAct2d: BN + SiLU in one module, ``--input CxHxW``, default 3x128x128) or
torchvision's ``r2plus1d_18`` (BatchNorm3d on clips, ``--input CxTxHxW``, default 3x8x56x56).
A training step is forward + cross-entropy backward + SGD step (``zero_grad(set_to_none=True)``);
an eval forward runs the model in eval mode under ``torch.inference_mode`` (bnfix's ABRi folds
its two BNs into one BN's parameters on every eval forward: nothing is cached). Variants are
interleaved inside every repeat (plain, naive, abri, ..., then the same rotated by one) after a
warm-up; the table shows median times and the median over rounds of each round's ratio to
plain BN, all measured in this run.

    python benchmarks/abri_step.py [--model resnet18|efficientnet_b0|r2plus1d_18]
        [--batch-size 8] [--input 1x256x128] [--repeats 7]
        [--device auto|cpu|cuda] [--threads N] [--amp] [--channels-last] [--eval-only]

:func:`run` returns the rows, so other scripts (``gpu_abri_check.py``) reuse the measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from bnfix.abri import ABRiBatchNorm2d, convert
from bnfix.batchnorm.kinds import kind_of, twin_class

TARGET_TRAIN = 1.10  # bnfix ABRi train step / plain BN train step
TARGET_EVAL = 1.02  # bnfix ABRi eval forward / plain BN eval forward
NAIVE_EXPECTED = "≈1.6–1.9×"
MIN_ROUNDS = 3
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
NOISY = 1.25  # slowest/fastest round above this: the machine was busy during the run


class NaiveABRi(nn.Module):
    """The paper's block as written: two BatchNorms, each normalising x, mixed by a learnt α,
    then what the layer runs after normalising (timm's BatchNormAct2d: drop and act)."""

    def __init__(self, bn: nn.Module, alpha: float = 0.5, per: str = "layer") -> None:
        super().__init__()
        ref = bn.weight
        plain = twin_class(type(bn))
        kw = {"device": ref.device, "dtype": ref.dtype}
        self.bn1 = plain(bn.num_features, bn.eps, bn.momentum, **kw)  # pretrained
        self.bn1.load_state_dict(bn.state_dict(), strict=False)  # strict=False: act's keys
        self.bn2 = plain(bn.num_features, bn.eps, bn.momentum, **kw)
        self.drop = getattr(bn, "drop", None) or nn.Identity()
        self.act = getattr(bn, "act", None) or nn.Identity()
        size = 1 if per == "layer" else bn.num_features
        self.alpha = nn.Parameter(torch.full((size,), alpha, device=ref.device))
        self.train(bn.training)

    def forward(self, x: Tensor) -> Tensor:
        a = self.alpha.view(-1, *[1] * (x.dim() - 2))
        return self.act(self.drop(a * self.bn1(x) + (1 - a) * self.bn2(x)))


def naive_convert(model: nn.Module, alpha: float = 0.5, per: str = "layer") -> nn.Module:
    """Swap every BatchNorm for :class:`NaiveABRi` in place, as ``convert`` does."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and kind_of(module) is not None:
            parent, _, leaf = name.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            setattr(owner, leaf, NaiveABRi(module, alpha, per))
    return model


# key: (label in the table, how to turn plain-BN ResNet-18 into the variant, in place)
VARIANTS: dict[str, tuple[str, Callable[[nn.Module], nn.Module]]] = {
    "plain": ("plain BN", lambda m: m),
    "naive": ("naive two-BN ABRi", naive_convert),
    "abri-layer": ("bnfix ABRi/layer", lambda m: convert(m, 0.5, "layer")),
    "abri-channel": ("bnfix ABRi/channel", lambda m: convert(m, 0.5, "channel")),
}
BASELINE = "plain"
CHECKED = ("abri-layer", "abri-channel")  # rows held to the targets


#: --model: (description, default --input, default --batch-size)
MODELS = {
    "resnet18": ("ResNet-18", "1x256x128", 8),
    "efficientnet_b0": ("timm efficientnet_b0 (BatchNormAct2d)", "3x128x128", 8),
    "r2plus1d_18": ("torchvision r2plus1d_18 (BatchNorm3d)", "3x8x56x56", 2),
}


def parse_input(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(v) for v in text.lower().split("x"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"--input wants CxTxF such as 1x256x128 (CxTxHxW for r2plus1d_18), not {text!r}"
        ) from exc
    if len(dims) not in (3, 4):
        raise argparse.ArgumentTypeError(f"--input wants 3 or 4 sizes, not {text!r}")
    return dims


def input_arg(text: str) -> str:
    parse_input(text)  # argparse turns the ArgumentTypeError into a usage message
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=list(MODELS), default="resnet18")
    parser.add_argument("--batch-size", type=int, default=None, help="default: per model")
    parser.add_argument(
        "--input",
        type=input_arg,
        default=None,
        help="C x T x F of one spectrogram (resnet18), C x H x W (efficientnet_b0), "
        "C x T x H x W (r2plus1d_18); default per model",
    )
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (medians over them)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument(
        "--iters", type=int, default=1, help="steps / forwards per variant inside one timed round"
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=90.0,
        help=f"seconds after which no new round starts (at least {MIN_ROUNDS} are kept)",
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument(
        "--amp", action="store_true", help="bf16 autocast (on CPU too when the device is CPU)"
    )
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument(
        "--eval-only", action="store_true", help="time eval forwards only, no training steps"
    )
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="cpu: this process's CPU time, steadier than wall time on a machine other jobs "
        "share (CPU device only; use it with --threads 1, where no thread spins waiting)",
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=list(VARIANTS),
        default=list(VARIANTS),
        help="which to time (plain BN always runs: it is the baseline)",
    )
    return parser


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch.cuda.is_available() is False")
    return torch.device(name)


def fill_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """The model's own default input and batch size where the command line gave none."""
    _, size, batch = MODELS[getattr(args, "model", "resnet18")]
    if getattr(args, "input", None) is None:
        args.input = size
    if getattr(args, "batch_size", None) is None:
        args.batch_size = batch
    want = 4 if getattr(args, "model", "resnet18") == "r2plus1d_18" else 3
    if len(parse_input(args.input)) != want:
        raise SystemExit(f"--input for {args.model} wants {want} sizes, not {args.input!r}")
    return args


def base_model(args: argparse.Namespace) -> nn.Module:
    torch.manual_seed(0)
    name = getattr(args, "model", "resnet18")
    channels = parse_input(args.input)[0]
    if name == "efficientnet_b0":
        import timm

        return timm.create_model(name, num_classes=args.num_classes, in_chans=channels)
    if name == "r2plus1d_18":
        model = torchvision.models.video.r2plus1d_18(num_classes=args.num_classes)
        if channels != 3:
            old = model.stem[0]
            model.stem[0] = nn.Conv3d(
                channels, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False
            )
        return model
    model = torchvision.models.resnet18(num_classes=args.num_classes)
    old = model.conv1
    model.conv1 = nn.Conv2d(channels, old.out_channels, 7, 2, 3, bias=False)
    return model


def machine_line(device: torch.device) -> str:
    if device.type == "cuda":
        where = f"cuda ({torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda})"
    else:
        where = f"cpu ({platform.processor() or platform.machine()})"
    return (
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, device {where}, "
        f"{torch.get_num_threads()} CPU threads, python {platform.python_version()}"
    )


@dataclass
class Runner:
    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(args: argparse.Namespace, device: torch.device) -> contextlib.AbstractContextManager:
    if not args.amp:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def train_step(
    r: Runner, x: Tensor, y: Tensor, amp: Callable[[], contextlib.AbstractContextManager]
) -> None:
    r.optimizer.zero_grad(set_to_none=True)
    with amp():
        loss = F.cross_entropy(r.model(x), y)
    loss.backward()
    r.optimizer.step()


def eval_forward(
    r: Runner, x: Tensor, amp: Callable[[], contextlib.AbstractContextManager]
) -> None:
    with torch.inference_mode(), amp():
        r.model(x)


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched: a device-independent proxy for kernel launches."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn: Callable[[], None]) -> int:
    with OpCounter() as counter:
        fn()
    return counter.count


@contextlib.contextmanager
def timed(
    samples: list[float], device: torch.device, iters: int, clock: Callable[[], float]
) -> Iterator[None]:
    sync(device)
    start = clock()
    yield
    sync(device)
    samples.append((clock() - start) * 1000.0 / iters)


def median(samples: list[float]) -> float:
    """The median, NaN for no samples (training is not timed under ``--eval-only``)."""
    return statistics.median(samples) if samples else math.nan


def paired_ratio(samples: list[float], base: list[float]) -> float:
    """Median over rounds of (this round's time / plain BN's time in the same round).

    Rounds that share the machine's load are compared with each other, so a busy spell that
    slows a whole round cancels out instead of landing on whichever variant it hit.
    """
    return median([s / b for s, b in zip(samples, base, strict=True)])


def spread(samples: list[float]) -> float:
    """Slowest round / fastest round: 1.0 on a quiet machine, far above it on a busy one."""
    return max(samples) / min(samples) if samples else 1.0


def fold_cost_ms(
    model: nn.Module, device: torch.device, clock: Callable[[], float], repeats: int = 50
) -> float:
    """What one eval forward spends on folding its ABRi blocks (0 for a model without any).

    Every eval forward of an ABRi block first computes the one BN it equals
    (:meth:`ABRiBatchNorm2d.eval_affine`); timing that alone, many times, isolates the cost
    the whole-forward timings above only show inside their noise. Median of ``repeats``.
    """
    blocks = [m for m in model.modules() if isinstance(m, ABRiBatchNorm2d)]
    if not blocks:
        return 0.0
    samples: list[float] = []
    with torch.inference_mode():
        for _ in range(repeats + 5):
            with timed(samples, device, 1, clock):
                for block in blocks:
                    block.eval_affine()
    return statistics.median(samples[5:])


def run(args: argparse.Namespace) -> list[dict]:
    """Time every variant (interleaved) and return one row per variant, the baseline first.

    Each row: ``variant``, ``train_ms`` and ``eval_ms`` (medians over rounds), ``train_ratio``
    and ``eval_ratio`` (against plain BN, see :func:`paired_ratio`), ``*_spread`` (see
    :func:`spread`), the raw per-round samples and the eval outputs' largest difference from
    plain BN before any training (all variants compute the same function then), the aten
    ops one train step and one eval forward dispatch (``train_ops``, ``eval_ops``), and the
    part of an eval forward spent folding the ABRi blocks (``fold_ms``, :func:`fold_cost_ms`).
    """
    fill_defaults(args)
    device = resolve_device(args.device)
    if args.clock == "cpu" and device.type != "cpu":
        raise SystemExit("--clock cpu measures CPU work: it means nothing for a CUDA run")
    clock = CLOCKS[args.clock]
    if args.threads:
        torch.set_num_threads(args.threads)
    video = len(parse_input(args.input)) == 4
    if args.channels_last:
        fmt = torch.channels_last_3d if video else torch.channels_last
    else:
        fmt = torch.contiguous_format
    base = base_model(args)
    names = [BASELINE, *(k for k in VARIANTS if k in args.variants and k != BASELINE)]
    runners = []
    for name in names:
        model = VARIANTS[name][1](copy.deepcopy(base)).to(device, memory_format=fmt)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        runners.append(Runner(name, model, optimizer))

    gen = torch.Generator().manual_seed(1)
    shape = (args.batch_size, *parse_input(args.input))
    x = torch.randn(shape, generator=gen).to(device).contiguous(memory_format=fmt)
    y = torch.randint(0, args.num_classes, (args.batch_size,), generator=gen).to(device)

    def amp() -> contextlib.AbstractContextManager:
        return autocast(args, device)

    # Before any step every variant is the same function (α mixes two identical fresh BNs).
    outputs = {}
    for r in runners:
        r.model.eval()
        with torch.inference_mode(), amp():
            outputs[r.name] = r.model(x).float().cpu()
    ref = outputs[BASELINE]
    # Ops per step do not depend on the input's size: count them on a small batch, untimed.
    small_x = (x[:2, :, :4, :32, :32] if video else x[:2, :, :64, :64]).contiguous(
        memory_format=fmt
    )
    ops = {}
    for r in runners:
        train_ops = 0
        if not args.eval_only:
            r.model.train()
            train_ops = count_ops(lambda r=r: train_step(r, small_x, y[:2], amp))
        r.model.eval()
        eval_forward(r, small_x, amp)  # untimed: the first call pays one-off costs
        ops[r.name] = (train_ops, count_ops(lambda r=r: eval_forward(r, small_x, amp)))

    train: dict[str, list[float]] = {r.name: [] for r in runners}
    evals: dict[str, list[float]] = {r.name: [] for r in runners}
    start = time.perf_counter()
    for round_ in range(args.warmup + args.repeats):
        keep = round_ >= args.warmup
        timed_rounds = round_ - args.warmup  # completed so far
        if timed_rounds >= MIN_ROUNDS and time.perf_counter() - start > args.budget_s:
            break  # a busy machine: stop with the rounds in hand rather than run for ever
        k = round_ % len(runners)  # rotate the order so that no variant always goes first
        order = runners[k:] + runners[:k]
        for r in order:
            if args.eval_only:
                break
            r.model.train()
            with timed(train[r.name], device, args.iters, clock):
                for _ in range(args.iters):
                    train_step(r, x, y, amp)
        for r in order:
            r.model.eval()
            with timed(evals[r.name], device, args.iters, clock):
                for _ in range(args.iters):
                    eval_forward(r, x, amp)
        if not keep:
            for r in runners:
                if train[r.name]:
                    train[r.name].pop()
                evals[r.name].pop()

    rows = []
    for r in runners:
        rows.append(
            {
                "key": r.name,
                "variant": VARIANTS[r.name][0],
                "train_ms": median(train[r.name]),
                "train_ratio": paired_ratio(train[r.name], train[BASELINE]),
                "eval_ms": statistics.median(evals[r.name]),
                "eval_ratio": paired_ratio(evals[r.name], evals[BASELINE]),
                "train_spread": spread(train[r.name]),
                "eval_spread": spread(evals[r.name]),
                "fold_ms": fold_cost_ms(r.model, device, clock),
                "rounds": len(evals[r.name]),
                "train_ops": ops[r.name][0],
                "eval_ops": ops[r.name][1],
                "train_samples_ms": train[r.name],
                "eval_samples_ms": evals[r.name],
                "max_abs_diff_vs_plain_at_init": float((outputs[r.name] - ref).abs().max()),
            }
        )
    return rows


def config_line(args: argparse.Namespace, device: torch.device, rounds: int) -> str:
    cut = f" (time budget: {rounds} of {args.repeats})" if rounds < args.repeats else ""
    name, _, _ = MODELS[getattr(args, "model", "resnet18")]
    layout = {"resnet18": "C×T×F", "efficientnet_b0": "C×H×W"}.get(
        getattr(args, "model", "resnet18"), "C×T×H×W"
    )
    return (
        f"{name}, batch {args.batch_size} × {args.input} ({layout}), {device.type}, "
        f"{'bf16 autocast' if args.amp else 'fp32'}, "
        f"{'channels_last' if args.channels_last else 'contiguous'}, {args.clock} clock, "
        f"median of {rounds} interleaved rounds{cut} × {args.iters} after {args.warmup} warm-up"
    )


def ratio_cell(ratio: float, target: float | None) -> str:
    if math.isnan(ratio):
        return "—"
    if target is None:
        return f"{ratio:.3f}×"
    return f"{ratio:.3f}× {'ok' if ratio <= target else 'MISS'}"


def print_table(rows: list[dict], args: argparse.Namespace, console: Console | None = None) -> None:
    device = resolve_device(args.device)
    console = console or Console()
    table = Table(
        title=f"ABRi step cost: {config_line(args, device, rows[0]['rounds'])}",
        title_justify="left",
        caption=f"targets: bnfix ABRi / plain BN ≤ {TARGET_TRAIN:.2f}× train step, "
        f"≤ {TARGET_EVAL:.2f}× eval forward (the naive two-BN block: {NAIVE_EXPECTED})\n"
        + machine_line(device),
        caption_justify="left",
    )
    for column in ("variant", "train ms", "train ×plain", "eval ms", "eval ×plain"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for row in rows:
        checked = row["key"] in CHECKED
        table.add_row(
            row["variant"],
            "—" if math.isnan(row["train_ms"]) else f"{row['train_ms']:.1f}",
            ratio_cell(row["train_ratio"], TARGET_TRAIN if checked else None),
            f"{row['eval_ms']:.1f}",
            ratio_cell(row["eval_ratio"], TARGET_EVAL if checked else None),
        )
    console.print(table)
    worst = max(r["max_abs_diff_vs_plain_at_init"] for r in rows)
    console.print(f"eval outputs at init, largest |Δ| from plain BN over the variants: {worst:.2e}")
    if args.eval_only:
        counts = ", ".join(f"{r['variant']} {r['eval_ops']}" for r in rows)
        console.print(f"aten ops per eval forward (≈ kernel launches): {counts}")
    else:
        counts = ", ".join(f"{r['variant']} {r['train_ops']}/{r['eval_ops']}" for r in rows)
        console.print(f"aten ops per train step/eval forward (≈ kernel launches): {counts}")
    plain = rows[0]["eval_ms"]
    folds = ", ".join(
        f"{r['variant']} {r['fold_ms']:.2f} ms ({100 * r['fold_ms'] / plain:.1f}% of plain BN's)"
        for r in rows
        if r["fold_ms"]
    )
    if folds:
        console.print(f"eval forward's folding of the ABRi blocks, timed alone: {folds}")
    noise = max(max(r["train_spread"], r["eval_spread"]) for r in rows)
    note = " (busy machine: treat the ratios as rough)" if noise > NOISY else ""
    console.print(f"slowest/fastest round, worst over the variants: {noise:.2f}×{note}")


def main() -> None:
    args = build_parser().parse_args()
    rows = run(args)
    print_table(rows, args)


if __name__ == "__main__":
    main()
