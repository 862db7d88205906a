"""Seeking vs decoding every frame: the cost of T=3 frames at the segment centres of 10 s clips.

A probe or a fusion pipeline takes a few frames per clip. ``bnfix.media.read_frames`` seeks to
the keyframe before each time and decodes forward from there; the alternative, decoding the
clip from the start, decodes all ~250 frames of a 10 s clip at 25 fps. This generates N clips
(H.264, 224x224, 25 fps, a keyframe every GOP frames: 50 is x264's usual 2 s for 25 fps
footage) and times both per clip:

- seek: ``read_frames(path, segment_times(duration, 3))`` (three RGB frames out);
- decode-all: every frame decoded, none converted (the cheapest sequential read);
- decode-all+rgb: every frame decoded and converted to RGB (what a read-the-whole-video
  loader such as ``torchvision.io.read_video`` pays).

Run ``python benchmarks/video_decode.py --clips 8``; ``measure`` is importable (the fusion
scale benchmark prints it).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bnfix.media import (  # noqa: E402
    decode_stats,
    read_frames,
    reset_decode_stats,
    segment_times,
    video_info,
)
from bnfix.media.synth import frame_index, write_video  # noqa: E402

SECONDS = 10.0
FPS = 25
SIZE = 224
FRAMES_PER_CLIP = 3


def make_clips(n_clips: int, workdir: Path, gop: int = 50) -> list[Path]:
    """N clips (reused if already there): x264 veryfast, crf 23, keyframe every ``gop``, a
    moving texture so that the bit rate (~1 Mb/s) and decode cost are those of real footage."""
    workdir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n_clips):
        path = workdir / f"clip_t_{gop}_{i:03d}.mp4"
        if not path.exists():
            write_video(
                path, SECONDS, fps=FPS, width=SIZE, height=SIZE, gop=gop,
                options={"preset": "veryfast", "crf": "23", "sc_threshold": "0"}, texture=0.5,
            )  # fmt: skip
        paths.append(path)
    return paths


def _decode_all(path: Path, rgb: bool) -> int:
    import av

    count = 0
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            if rgb:
                frame.to_ndarray(format="rgb24")
            count += 1
    return count


def _timed(fn, repeats: int) -> float:
    """Best of ``repeats`` (s): the machine is shared; the minimum is the decoder's cost."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure(n_clips: int, workdir: Path, gop: int = 50, repeats: int = 3) -> dict:
    """Per-clip seconds for seek (T=3), decode-all and decode-all+rgb, medians over clips."""
    paths = make_clips(n_clips, workdir, gop)
    seek, everything, everything_rgb, decoded, total = [], [], [], [], []
    for path in paths:
        times = segment_times(video_info(path).duration, FRAMES_PER_CLIP)
        frames = read_frames(path, times)  # warm the page cache; check the frames
        expected = [int(t * FPS) for t in times]
        got = [frame_index(f.numpy()) for f in frames]
        if got != expected:
            raise AssertionError(f"{path.name}: frames {got}, expected {expected}")
        reset_decode_stats()
        read_frames(path, times)
        decoded.append(decode_stats()["frames_decoded"])
        seek.append(_timed(lambda p=path, t=times: read_frames(p, t), repeats))
        total.append(_decode_all(path, rgb=False))
        everything.append(_timed(lambda p=path: _decode_all(p, rgb=False), repeats))
        everything_rgb.append(_timed(lambda p=path: _decode_all(p, rgb=True), repeats))
    seek_s = statistics.median(seek)
    all_s = statistics.median(everything)
    return {
        "clips": n_clips,
        "seconds_per_clip": SECONDS,
        "fps": FPS,
        "size": SIZE,
        "gop": gop,
        "frames_per_clip": statistics.median(total),
        "frames_decoded_seek": statistics.median(decoded),
        "seek_s_per_clip": seek_s,
        "decode_all_s_per_clip": all_s,
        "decode_all_rgb_s_per_clip": statistics.median(everything_rgb),
        "ratio": all_s / seek_s,
        "ratio_rgb": statistics.median(everything_rgb) / seek_s,
    }


def table(rows: list[dict]) -> str:
    head = (
        f"{'clips':>5} {'gop':>4} {'frames':>6} {'decoded':>7} {'seek s/clip':>11} "
        f"{'decode-all s/clip':>17} {'ratio':>6} {'+rgb s/clip':>11} {'ratio':>6}"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"{r['clips']:>5} {r['gop']:>4} {r['frames_per_clip']:>6.0f} "
            f"{r['frames_decoded_seek']:>7.0f} {r['seek_s_per_clip']:>11.4f} "
            f"{r['decode_all_s_per_clip']:>17.4f} {r['ratio']:>5.1f}x "
            f"{r['decode_all_rgb_s_per_clip']:>11.4f} {r['ratio_rgb']:>5.1f}x"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--gop", type=int, nargs="+", default=[25, 50])
    parser.add_argument("--workdir", type=Path, help="where the clips go [a temporary folder]")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        rows = [measure(args.clips, workdir, gop) for gop in args.gop]
    print(
        f"{SECONDS:.0f} s H.264 clips, {SIZE}x{SIZE}, {FPS} fps; T={FRAMES_PER_CLIP} frames at "
        "the segment centres; best of 3 per clip, median over clips"
    )
    print(table(rows))


if __name__ == "__main__":
    main()
