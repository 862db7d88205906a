"""Video-clip probe features for 3-D visual models: ``[3, T, H, W]`` from a folder of frames.

A 3-D stem (r3d_18, r2plus1d_18, s3d, ...) convolves over time, so one sample is a clip, not a
frame. A probe folder of frame folders gives one clip per folder, T frames picked evenly over
it; a video file gives one clip, T frames at its segment centres (:mod:`bnfix.media`). The
defaults are torchvision's Kinetics-400 presets for its video models (resize, centre
crop, mean/std), so batch statistics on the probe compare with what those models stored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from bnfix.errors import BnfixError
from bnfix.probe_image import decode_rgb

#: torchvision's ``VideoClassification`` preset values (Kinetics-400 weights).
KINETICS_MEAN = (0.43216, 0.394666, 0.37645)
KINETICS_STD = (0.22803, 0.22145, 0.216989)
#: (resize, crop) per torchvision video model; r3d_18 / mc3_18 / r2plus1d_18 share one.
PRESETS: dict[str, tuple[tuple[int, int], int]] = {
    "r3d_18": ((128, 171), 112),
    "mc3_18": ((128, 171), 112),
    "r2plus1d_18": ((128, 171), 112),
    "s3d": ((256, 256), 224),
}
DEFAULT_PRESET = "r2plus1d_18"


@dataclass(frozen=True)
class ClipOptions:
    """Parameters of the clip transform; the defaults are torchvision's r2plus1d_18 preset."""

    frames: int = 16  # T: frames per clip, picked evenly over the folder
    size: int = 112  # centre crop
    resize: tuple[int, int] = (128, 171)  # (height, width) before the crop
    mean: tuple[float, float, float] = KINETICS_MEAN
    std: tuple[float, float, float] = KINETICS_STD

    def __post_init__(self) -> None:
        if self.frames < 1:
            raise BnfixError(f"--clip-frames must be at least 1 (got {self.frames})")
        if self.size < 1 or min(self.resize) < 1:
            raise BnfixError(f"clip size and resize must be positive (got {self.size})")
        if not all(math.isfinite(s) and s > 0 for s in self.std):
            raise BnfixError(f"clip std values must be positive (got {self.std})")

    @classmethod
    def for_architecture(
        cls, arch: str | None, frames: int = 16, size: int | None = None
    ) -> ClipOptions:
        """The preset of a torchvision video model (others get r2plus1d_18's); ``size`` keeps
        the preset's resize-to-crop proportions."""
        resize, crop = PRESETS.get(arch or "", PRESETS[DEFAULT_PRESET])
        if size is not None and size != crop:
            resize = (round(resize[0] * size / crop), round(resize[1] * size / crop))
            crop = size
        return cls(frames=frames, size=crop, resize=resize)


def even_indices(count: int, frames: int) -> list[int]:
    """``frames`` indices spread evenly over ``count`` (segment centres); repeats when short."""
    return [min(count - 1, int((i + 0.5) * count / frames)) for i in range(frames)]


def read_clip(files: list[Path], opts: ClipOptions) -> torch.Tensor:
    """``[3, T, size, size]`` float32 from a sorted list of frame files."""
    if not files:
        raise BnfixError("holds no frame images")
    picked = [files[i] for i in even_indices(len(files), opts.frames)]
    decoded: dict[Path, torch.Tensor] = {}
    frames = []
    for f in picked:
        if f not in decoded:
            decoded[f] = decode_rgb(f)
        frames.append(decoded[f])
    if len({tuple(x.shape) for x in frames}) != 1:
        raise BnfixError("its frames differ in size; a clip's frames must share one size")
    return clip_features(torch.stack(frames), opts)


def read_video_clip(path: Path, opts: ClipOptions) -> torch.Tensor:
    """``[3, T, size, size]`` float32: T frames of a video file at its segment centres."""
    from bnfix.media import read_segments

    return clip_features(read_segments(path, opts.frames), opts)


def clip_features(video: torch.Tensor, opts: ClipOptions) -> torch.Tensor:
    """uint8 ``[T, 3, H, W]`` frames to the normalised ``[3, T, size, size]`` clip a 3-D model
    takes: the same transform for frame folders and video files."""
    import torchvision.transforms.v2.functional as TF

    video = TF.resize(video, list(opts.resize), antialias=False)  # as torchvision's preset
    video = TF.center_crop(video, [opts.size, opts.size])
    video = TF.to_dtype(video, torch.float32, scale=True)
    video = TF.normalize(video, list(opts.mean), list(opts.std))
    return video.permute(1, 0, 2, 3).contiguous()
