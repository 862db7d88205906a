"""What a probe scan costs over a bare forward pass on the same batches, measured in one run.

Time: the median of interleaved repetitions (bare, scan, bare, scan, ...) after a warm-up,
in this process. Memory: each variant runs once in a fresh subprocess that resets its peak-RSS
mark once the model and batches are in memory, then reads the peak after the run; the table
shows the whole peak and its growth above that floor (the activations, which hooks inflate).
The children run with glibc's mmap threshold fixed at 64 KiB so that freed tensors leave the
resident set at once: RSS then follows live tensors, not allocator fragmentation.
The bare pass uses the same batch-statistics BN mode as the scan, so the ratios isolate
the cost of the hooks.

    python benchmarks/scan_overhead.py [--arch resnet18] [--input 3x224x224] [--batches 6]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torchvision
from rich.console import Console
from rich.table import Table

from bnfix.probe_stats import batch_statistics_mode, collect

TARGET_TIME = 1.15
TARGET_MEMORY = 1.10


def make_inputs(args: argparse.Namespace) -> tuple[torch.nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    channels, height, width = (int(v) for v in args.input.split("x"))
    model = torchvision.models.get_model(args.arch)
    if channels != 3:  # an audio-shaped input: adapt the stem as bnfix does for 1-channel data
        conv = model.conv1 if hasattr(model, "conv1") else model.features[0][0]
        conv.weight = torch.nn.Parameter(conv.weight.sum(1, keepdim=True))
        conv.in_channels = 1
    gen = torch.Generator().manual_seed(1)
    shape = (args.batches * args.batch_size, channels, height, width)
    return model.eval(), list(torch.randn(shape, generator=gen).split(args.batch_size))


def bare(model: torch.nn.Module, batches: list[torch.Tensor]) -> None:
    with batch_statistics_mode(model), torch.inference_mode():
        for batch in batches:
            model(batch)


def scan(model: torch.nn.Module, batches: list[torch.Tensor]) -> None:
    collect(model, batches)


VARIANTS = {"bare": bare, "scan": scan}


def status_bytes(field: str) -> int:
    """A memory figure of this process from /proc (VmRSS, VmHWM), in bytes."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(args: argparse.Namespace) -> None:
    """Run one variant once in this fresh process; print its memory floor and peak as JSON.

    Writing 5 to clear_refs resets the peak-RSS mark (VmHWM) to the current RSS, so the peak
    read afterwards belongs to the variant alone, not to imports or model construction.
    """
    model, batches = make_inputs(args)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    floor = status_bytes("VmRSS")
    VARIANTS[args.child](model, batches)
    print(json.dumps({"floor": floor, "peak": status_bytes("VmHWM")}))


def measure_memory(args: argparse.Namespace, variant: str) -> dict[str, int]:
    command = [sys.executable, __file__, "--child", variant, *forwarded(args)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def forwarded(args: argparse.Namespace) -> list[str]:
    return ["--arch", args.arch, "--input", args.input, "--batches", str(args.batches),
            "--batch-size", str(args.batch_size), "--threads", str(args.threads)]  # fmt: skip


def measure_time(args: argparse.Namespace) -> dict[str, float]:
    model, batches = make_inputs(args)
    bare(model, batches[:1])
    scan(model, batches[:1])
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.repeats):
        for name, fn in VARIANTS.items():
            start = time.perf_counter()
            fn(model, batches)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--input", default="3x224x224", help="CxHxW of one sample")
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--child", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        memory_child(args)
        return

    seconds = measure_time(args)
    memory = {name: measure_memory(args, name) for name in VARIANTS}
    mib = 1 << 20
    growth = {name: m["peak"] - m["floor"] for name, m in memory.items()}
    rows = [
        ("time (median s)", seconds["bare"], seconds["scan"], TARGET_TIME, "{:.3f}"),
        ("peak RSS (MiB)", memory["bare"]["peak"] / mib, memory["scan"]["peak"] / mib,
         TARGET_MEMORY, "{:.0f}"),
        ("peak growth over floor (MiB)", growth["bare"] / mib, growth["scan"] / mib,
         TARGET_MEMORY, "{:.1f}"),
    ]  # fmt: skip
    samples = args.batches * args.batch_size
    table = Table(
        title=f"probe scan overhead: {args.arch}, {samples} samples of {args.input}, "
        f"batch {args.batch_size}, {args.threads} threads, torch {torch.__version__}",
        title_justify="left",
    )
    for column in ("measure", "bare forward", "probe scan", "ratio", "target"):
        table.add_column(column, justify="left" if column == "measure" else "right")
    for label, base, probe, target, fmt in rows:
        ratio = probe / base if base else float("nan")
        verdict = "" if target is None else f"≤ {target:.2f}× {'ok' if ratio <= target else 'MISS'}"
        table.add_row(label, fmt.format(base), fmt.format(probe), f"{ratio:.3f}×", verdict)
    Console().print(table)


if __name__ == "__main__":
    main()
