"""Image probe features: the standard ImageNet evaluation transform.

Resize the shorter side, centre-crop, scale to [0, 1], normalise with ImageNet mean/std: the
same input statistics an ImageNet or frame-based video CNN saw, so BatchNorm batch statistics
on the probe are comparable with the stored running statistics.

Readers raise :class:`~bnfix.errors.BnfixError` without a path for a file that cannot be used;
:func:`bnfix.probe.load_probe` turns those into ``skipped`` entries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bnfix.errors import BnfixError, one_line


@dataclass(frozen=True)
class ImageOptions:
    """Parameters of the image transform; the defaults are torchvision's ImageNet ones."""

    size: int = 224  # centre crop
    resize: int = 256  # shorter side before the crop
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __post_init__(self) -> None:
        if self.size < 1 or self.resize < 1:
            raise BnfixError(
                f"image size and resize must be positive (got {self.size}, {self.resize})"
            )
        if len(self.mean) != 3 or len(self.std) != 3:
            raise BnfixError("image mean and std need one value per RGB channel")
        if not all(math.isfinite(s) and s > 0 for s in self.std):
            raise BnfixError(f"image std values must be positive (got {self.std})")


class ImageDecodeError(BnfixError):
    """An image file that cannot be decoded; ``reason`` is the bare one-line cause."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"cannot decode image: {reason}")


#: Pillow modes whose pixels are 16-bit unsigned integers.
_UINT16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
#: Pillow decodes 16-bit colour PNGs to 8 bits by keeping the high byte (a truncation, not a
#: rounding); these raw modes mark such files, which are decoded again at full depth.
_PNG16_COLOUR_RAWMODES = ("RGB;16B", "RGBA;16B", "LA;16B")


def decode_rgb(path: Path) -> torch.Tensor:
    """The image in ``path`` as RGB uint8 ``[3, H, W]``: the one decoder of probes and frames.

    8-bit images go through Pillow's ``convert("RGB")`` (greyscale, palette, RGBA with the alpha
    dropped, CMYK...). Deeper images are scaled to 8 bits by their bit depth, not clipped:

    - 16-bit (greyscale ``I;16``, or RGB/RGBA/grey+alpha PNGs): ``v → round(v / 257)``;
    - 32-bit integer (``I``): ``v → round(v · 255 / (2³¹ − 1))``, negatives clipped to 0 (a
      mode ``I`` image read from 16-bit data is scaled as 16-bit);
    - float (``F``): values in [0, 1] (the float-image convention) are scaled by 255; an image
      with larger values is taken on Pillow's 0–255 scale and clipped. NaN or ±inf is refused.

    Decoding the whole file here (not lazily) makes a truncated file fail here, not later.
    Raises :class:`ImageDecodeError` (no path: callers name the file their way).
    """
    try:
        with Image.open(path) as im:
            rawmode = _rawmode(im)
            im.load()
            if im.mode in ("I", "F") or im.mode in _UINT16_MODES:
                rgb = _deep_to_uint8(im, rawmode)
            elif rawmode in _PNG16_COLOUR_RAWMODES and (full := _png16(path)) is not None:
                rgb = full
            else:
                rgb = np.array(im.convert("RGB"), dtype=np.uint8)
    except ImageDecodeError:
        raise
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError... on bad input
        raise ImageDecodeError(one_line(e)) from e
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[:, :, None], 3, axis=2)
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).contiguous()


def _rawmode(im: Image.Image) -> str:
    """How the file stores its pixels (``"I;16B"``, ``"RGB;16B"``...), or "" when unknown."""
    try:
        args = im.tile[0].args if im.tile else None
    except (AttributeError, IndexError, TypeError):
        return ""
    if isinstance(args, tuple):
        args = args[0] if args else None
    return args if isinstance(args, str) else ""


def _deep_to_uint8(im: Image.Image, rawmode: str) -> np.ndarray:
    """A 16-bit, 32-bit integer or float greyscale image as ``[H, W]`` uint8, by bit depth."""
    if im.mode in _UINT16_MODES or (im.mode == "I" and ";16" in rawmode):
        v = np.asarray(im).astype(np.uint32)
        return ((v + 128) // 257).astype(np.uint8)  # round(v / 257): 65535 → 255, 257 → 1
    if im.mode == "I":
        v = np.asarray(im).astype(np.float64).clip(0, None)
        return np.rint(v * (255 / (2**31 - 1))).clip(0, 255).astype(np.uint8)
    v = np.asarray(im).astype(np.float64)  # mode F
    if not np.isfinite(v).all():
        raise ImageDecodeError("float image holds NaN or infinite values")
    top = float(v.max()) if v.size else 0.0
    scale = 255.0 if top <= 1.0 else 1.0
    return np.rint(v * scale).clip(0, 255).astype(np.uint8)


def _png16(path: Path) -> np.ndarray | None:
    """A 16-bit colour PNG at full depth, scaled to ``[H, W, 3]`` uint8; None if unavailable."""
    try:
        from torchvision.io import ImageReadMode, decode_png, read_file

        v = decode_png(read_file(str(path)), mode=ImageReadMode.UNCHANGED)
    except Exception:  # no libpng in this torchvision build: Pillow's 8-bit reading stands
        return None
    if v.dtype != torch.uint16 or v.shape[0] not in (1, 2, 3, 4):
        return None
    colour = v[:3] if v.shape[0] >= 3 else v[:1].expand(3, -1, -1)  # alpha dropped
    scaled = (colour.to(torch.int32) + 128) // 257
    return scaled.to(torch.uint8).permute(1, 2, 0).numpy()


def read_image(path: Path, opts: ImageOptions) -> torch.Tensor:
    """Decode ``path`` as RGB (:func:`decode_rgb`) and transform it to ``[3, size, size]``."""
    return image_features(decode_rgb(path), opts)


def image_features(image: torch.Tensor, opts: ImageOptions) -> torch.Tensor:
    """Transform a ``[3, H, W]`` image (uint8, or float in [0, 1]) to normalised float32.

    Resizing happens on uint8 when given uint8, as torchvision's ImageNet pipeline does, so the
    rounding matches what pretrained models were evaluated with.
    """
    import torchvision.transforms.v2.functional as TF

    x = TF.resize(image, [opts.resize], antialias=True)
    x = TF.center_crop(x, [opts.size, opts.size])
    x = TF.to_dtype(x, torch.float32, scale=True)
    return TF.normalize(x, list(opts.mean), list(opts.std))


def read_video_frame(path: Path, opts: ImageOptions) -> torch.Tensor:
    """A video file's middle frame (its one segment centre), transformed as an image.

    One frame per video: a 2-D model sees frames one by one, and the middle frame is the
    deterministic choice an evaluation makes.
    """
    from bnfix.media import read_segments

    return image_features(read_segments(path, 1)[0], opts)
