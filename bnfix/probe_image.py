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

from bnfix.errors import BnfixError


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


def read_image(path: Path, opts: ImageOptions) -> torch.Tensor:
    """Decode ``path`` as RGB and transform it to ``[3, size, size]``.

    ``convert("RGB")`` makes greyscale, palette, RGBA (alpha dropped) and CMYK files look like
    the 3-channel images an RGB stem expects; it also forces the lazy decoder to read the whole
    file, so a truncated file fails here rather than later.
    """
    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB")
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError... on bad input
        text = (str(e) or type(e).__name__).strip().splitlines()[0]
        raise BnfixError(f"cannot decode image: {text}") from e
    pixels = torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1)
    return image_features(pixels, opts)


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
