"""What the fusion data path saves, measured in one run on data it generates itself.

(a) An epoch of data: ``load_features`` with a warm store and every row read once, against
    decoding every clip and computing its fbank and decoding and resizing its frames again
    (what a dataset that decodes in ``__getitem__``, like the official FusT code, pays every
    epoch; run sequentially, as one DataLoader worker does). The one-time cost of filling the
    store is shown too.
(b) Stage-2 masking of one batch: ``mask_patches`` against a per-sample Python loop like the
    official code's (``random.sample`` of patch indices, then zeroing patch by patch), on the
    same shapes and ratios. Both leave the input intact and return a masked copy, so the loop
    works on a copy of the batch; a second row shows the loop in place (no copy), as the
    official dataset masks its freshly decoded per-sample tensor.

Times are medians of interleaved repetitions (a, b, a, b, ...) after a warm-up.

    python benchmarks/fusion_data.py [--clips 64] [--seconds 10] [--repeats 5] [--batch 64]
                                     [--threads N]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import rich.console
import soundfile as sf
import torch
from PIL import Image
from rich.table import Table

from bnfix.fusion.features import VisualOptions, decode_frame, frame_files, load_features
from bnfix.fusion.features import frame_indices as pick
from bnfix.fusion.manifest import Manifest, read_manifest
from bnfix.fusion.masking import AUDIO_PATCH, VISUAL_PATCH, mask_patches
from bnfix.probe_audio import AudioOptions, features_with_length, normalise, read_audio

TARGET_LOAD = 5.0
TARGET_MASK = 20.0


def make_dataset(folder: Path, clips: int, seconds: float, frames: int) -> Path:
    """KS-like clips: 16 kHz mono WAVs and folders of 320x240 JPEG frames at 1 fps."""
    rng = np.random.default_rng(0)
    rate = 16000
    rows = ["id,audio,frames,label,split"]
    t = np.arange(int(seconds * rate)) / rate
    for i in range(clips):
        tone = 0.2 * np.sin(2 * np.pi * rng.uniform(100, 2000) * t)
        wave = tone + 0.05 * rng.standard_normal(t.size)
        sf.write(str(folder / f"{i}.wav"), wave.astype(np.float32), rate, subtype="PCM_16")
        clip = folder / f"{i}"
        clip.mkdir()
        base = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
        for k in range(frames):
            Image.fromarray(np.roll(base, 8 * k, axis=1)).save(clip / f"frame_{k:05d}.jpg")
        split = "train" if i < clips * 3 // 4 else "test"
        rows.append(f"c{i},{i}.wav,{i},{i % 8},{split}")
    (folder / "manifest.csv").write_text("\n".join(rows) + "\n")
    return folder / "manifest.csv"


def read_all(features) -> None:
    """Every row of the memory-mapped stores, as an epoch of training reads them."""
    features.audio[:]
    features.visual[:]


def decode_epoch(manifest: Manifest, audio: AudioOptions, visual: VisualOptions) -> None:
    """Decode and compute everything again, as a dataset without a cache does each epoch."""
    fbanks, lengths, videos = [], [], []
    for s in manifest.samples:
        assert s.audio is not None and s.frames is not None
        fbank, n = features_with_length(*read_audio(s.audio, audio), audio)
        fbanks.append(fbank)
        lengths.append(n)
        files = frame_files(s.frames)
        chosen = [files[k] for k in pick(len(files), visual.frames)]
        videos.append(torch.stack([decode_frame(f, visual.stored_size) for f in chosen]))
    normalise(torch.stack(fbanks), lengths, audio)
    torch.stack(videos)


def loop_mask(x: torch.Tensor, ratios: torch.Tensor, patch: tuple[int, int], copy: bool):
    """The official code's masking, one sample (and frame) and one patch at a time."""
    out = x.clone() if copy else x
    ph, pw = patch
    gh, gw = x.shape[-2] // ph, x.shape[-1] // pw
    total = gh * gw
    for b, r in enumerate(ratios.tolist()):
        if r <= 0:
            continue
        for image in out[b] if x.ndim == 5 else [out[b]]:
            for index in random.sample(range(total), int(total * r)):
                y, x0 = index // gw * ph, index % gw * pw
                image[:, y : y + ph, x0 : x0 + pw] = 0.0
    return out


def interleaved(variants: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    for f in variants.values():  # warm-up: imports, kernels, page cache
        f()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, f in variants.items():
            start = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--frames-per-clip", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    console = rich.console.Console(width=120)
    quiet = rich.console.Console(quiet=True)
    audio, visual = AudioOptions(), VisualOptions()
    torch.manual_seed(0)
    random.seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        manifest = read_manifest(make_dataset(root, args.clips, args.seconds, args.frames_per_clip))
        cache = root / "cache"
        start = time.perf_counter()
        load_features(manifest, audio, visual, cache, quiet)
        fill = time.perf_counter() - start
        load = interleaved(
            {
                "warm": lambda: read_all(load_features(manifest, audio, visual, cache, quiet)),
                "decode": lambda: decode_epoch(manifest, audio, visual),
            },
            max(3, args.repeats // 2),
        )

    b = args.batch
    gen = torch.Generator().manual_seed(0)
    shapes = {
        "audio": (torch.randn(b, 1, audio.target_frames, audio.num_mel_bins), AUDIO_PATCH),
        "visual": (torch.randn(b, visual.frames, 3, visual.size, visual.size), VISUAL_PATCH),
    }
    ratios = torch.rand(b, generator=gen) * 0.4 + 0.1  # every sample masked, 10-50% of patches
    mask: dict[str, dict[str, float]] = {}
    for name, (x, patch) in shapes.items():
        mask[name] = interleaved(
            {
                "batched": lambda x=x, p=patch: mask_patches(x, ratios, p, gen),
                "loop": lambda x=x, p=patch: loop_mask(x, ratios, p, copy=True),
                "loop_inplace": lambda x=x, p=patch: loop_mask(x.clone(), ratios, p, copy=False),
                "copy": lambda x=x: x.clone(),
            },
            args.repeats,
        )
        # the in-place row's own copy (made so that repeats stay comparable) is not its cost
        mask[name]["loop_inplace"] -= mask[name]["copy"]

    table = Table(title=f"fusion data path, {torch.get_num_threads()} torch threads")
    for column in ("measured", "baseline", "bnfix", "speed-up", "target"):
        table.add_column(column, justify="left" if column == "measured" else "right")
    table.add_row(
        f"(a) epoch: {args.clips} clips of {args.seconds:g} s + {visual.frames} frames",
        f"{load['decode']:.3f} s decode",
        f"{load['warm']:.3f} s cache",
        f"{load['decode'] / load['warm']:.1f}x",
        f">= {TARGET_LOAD:g}x",
    )
    table.add_row("    one-time cache fill", "", f"{fill:.3f} s", "", "")
    for name, m in mask.items():
        shape = "x".join(map(str, shapes[name][0].shape))
        for label, key in (("loop on a copy", "loop"), ("loop in place", "loop_inplace")):
            table.add_row(
                f"(b) mask {name} {shape} vs {label}",
                f"{m[key] * 1e3:.1f} ms",
                f"{m['batched'] * 1e3:.1f} ms",
                f"{m[key] / m['batched']:.1f}x",
                f">= {TARGET_MASK:g}x",
            )
        table.add_row(f"    copying the {name} batch", "", f"{m['copy'] * 1e3:.1f} ms", "", "")
    console.print(table)


if __name__ == "__main__":
    main()
