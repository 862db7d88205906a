"""Use case: scan a 3-D video model (torchvision's r2plus1d_18) on clips of your own frames.

    python examples/scan_video_model.py [CKPT] [FRAME_FOLDERS] [--clip-frames 8]

FRAME_FOLDERS holds one folder of extracted frames per clip (``clip1/0001.jpg, ...``). Without
arguments a randomly initialised r2plus1d_18 and a few generated clips are used (nothing is
downloaded). The CLI equivalent is
``bnfix scan CKPT --modality visual --probe FRAME_FOLDERS --clip-frames 8``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file

from bnfix.recommend import recommend
from bnfix.scan_run import ScanRequest, run_scan


def _demo_inputs(folder: Path) -> tuple[Path, Path]:
    torch.manual_seed(0)
    ckpt = folder / "r2plus1d_18.safetensors"
    model = torchvision.models.video.r2plus1d_18()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, ckpt)
    rng = np.random.default_rng(0)
    for c in range(4):  # four "videos": a moving bright square on noise
        clip = folder / "clips" / f"clip{c}"
        clip.mkdir(parents=True)
        for t in range(10):
            frame = rng.integers(0, 60, (72, 96, 3), dtype=np.uint8)
            x = 8 + 6 * t + 4 * c
            frame[20:44, x : x + 24] = 220
            Image.fromarray(frame).save(clip / f"{t:04d}.png")
    return ckpt, folder / "clips"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ckpt", nargs="?", type=Path)
    parser.add_argument("clips", nargs="?", type=Path)
    parser.add_argument("--clip-frames", type=int, default=8)
    parser.add_argument("--clip-size", type=int, default=None)
    args = parser.parse_args()
    ckpt, clips = args.ckpt, args.clips
    if ckpt is None or clips is None:
        ckpt, clips = _demo_inputs(Path(tempfile.mkdtemp()))

    request = ScanRequest(
        [ckpt],
        modality="visual",
        probe=clips,
        clip_frames=args.clip_frames,
        clip_size=args.clip_size,
    )
    (report,) = run_scan(request)
    summary = report.summary
    print(
        f"{report.architecture}: {report.probe_samples} clips of {args.clip_frames} frames; "
        f"{summary.unusable} of {summary.channels} channels dead, capacity used "
        f"{summary.capacity_used:.1%}"
    )
    rec = recommend(report)
    print(f"recommendation: {rec.action} — {'; '.join(rec.reasons)}")


if __name__ == "__main__":
    main()
