"""What a run pays before its first epoch on a large dataset, and how it grows with the rows.

Every run reads its manifest (each cell checked and resolved) and computes each sample's store
entry per modality (a stat of the source and a digest of it and the parameters), even when
every feature is already in the store. Measured on a generated VGGSound-style layout of empty
files (``<ytid>_<start:06d>.mp4`` in one folder, a ``video`` column: the paths, not the media,
are what costs here), at two sizes, against a baseline measured in the same run: the CSV read
plus one ``os.stat`` per row, the floor any check of the files pays.

    python benchmarks/manifest_scale.py [--sizes 10000,100000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bnfix.fusion.features import VisualOptions
from bnfix.fusion.kinds import AudioKind, VisualKind
from bnfix.fusion.manifest import read_manifest
from bnfix.probe_audio import AudioOptions


def make_layout(folder: Path, n: int) -> Path:
    videos = folder / "video"
    videos.mkdir(parents=True)
    manifest = folder / "manifest.csv"
    with open(manifest, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "label", "split", "video"])
        for i in range(n):
            name = f"yt{i:07d}_{i % 300:06d}"
            (videos / f"{name}.mp4").touch()
            writer.writerow([name, f"class{i % 309}", "test" if i % 10 == 0 else "train",
                             f"video/{name}.mp4"])  # fmt: skip
    return manifest


def baseline(manifest: Path) -> None:
    """The CSV read and one stat per row."""
    root = manifest.parent
    with open(manifest, newline="") as fh:
        for row in csv.DictReader(fh):
            os.stat(root / row["video"])


def median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(manifest: Path, kinds: dict, repeats: int) -> tuple[float, float, float]:
    """Seconds for the baseline, for reading the manifest, and for every entry of both kinds."""
    base = median_time(lambda: baseline(manifest), repeats)
    read = median_time(lambda: read_manifest(manifest), repeats)
    samples = read_manifest(manifest).samples
    entries = median_time(lambda: [k.entry(s) for k in kinds.values() for s in samples], repeats)
    return base, read, entries


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="10000,100000")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    kinds = {"audio": AudioKind(AudioOptions()), "visual": VisualKind(VisualOptions())}
    table = Table(title="before the first epoch: seconds (µs per row), ratio to the baseline")
    for column in ("rows", "baseline", "read_manifest", "entries (both)", "total", "ratio"):
        table.add_column(column, justify="right")
    per_row = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            base, read, entries = measure(make_layout(Path(tmp) / str(n), n), kinds, args.repeats)
            total = read + entries
            per_row[n] = total / n
            table.add_row(
                f"{n:,}",
                *(f"{t:.2f} ({1e6 * t / n:.0f})" for t in (base, read, entries, total)),
                f"{total / base:.1f}x",
            )
    Console().print(table)
    if len(sizes) > 1:
        lo, hi = sizes[0], sizes[-1]
        print(f"cost per row at {hi:,} rows / at {lo:,}: {per_row[hi] / per_row[lo]:.2f}x "
              "(1.0 = linear)")  # fmt: skip


if __name__ == "__main__":
    main()
