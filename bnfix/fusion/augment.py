"""Visual augmentation on cached uint8 frames, batched on the training device.

The cache stores frames once, resized and centre-cropped to a square a little larger than the
training crop (``S = round(size * 8 / 7)``, 256 for 224: the ImageNet resize/crop ratio), so
per-epoch augmentation is a crop, a flip and a normalisation of tensors that are already in
memory: no image decoding per epoch and no Python loop per sample.
"""

from __future__ import annotations

import torch

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "visual_batch"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def visual_batch(
    x_uint8: torch.Tensor, size: int, train: bool, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``[B, T, 3, S, S]`` uint8 frames -> ``[B, T, 3, size, size]`` float32, ImageNet-normalised.

    ``train``: a random ``size`` crop and a random horizontal flip per sample, the same for all
    T frames of a sample (a clip is one scene; jittering its frames apart would be a different
    augmentation). Otherwise the centre crop, placed as torchvision's ``center_crop`` places it.
    ``generator`` may live on any device.
    """
    if x_uint8.ndim != 5 or x_uint8.shape[2] != 3:
        raise ValueError(f"visual_batch takes [B, T, 3, S, S] frames, not {list(x_uint8.shape)}")
    if x_uint8.dtype != torch.uint8:
        raise ValueError(f"visual_batch takes uint8 frames, not {x_uint8.dtype}")
    batch, _, _, height, width = x_uint8.shape
    if size < 1 or size > min(height, width):
        raise ValueError(f"crop size {size} does not fit frames of {height}x{width}")
    device = x_uint8.device
    steps = torch.arange(size, device=device)
    if train:
        top = _randint(height - size + 1, batch, device, generator)
        left = _randint(width - size + 1, batch, device, generator)
        flip = _randint(2, batch, device, generator).bool()
        # A flipped crop reads its columns right to left: the flip costs nothing extra.
        cols = torch.where(flip[:, None], left[:, None] + size - 1 - steps, left[:, None] + steps)
        rows = top[:, None] + steps
        index_b = torch.arange(batch, device=device)[:, None, None]
        # Advanced indices on dims 0, 3, 4 around the T and C slices: result [B, size, size, T, 3].
        crops = x_uint8[index_b, :, :, rows[:, :, None], cols[:, None, :]]
        crops = crops.permute(0, 3, 4, 1, 2)
    else:
        top = round((height - size) / 2.0)
        left = round((width - size) / 2.0)
        crops = x_uint8[..., top : top + size, left : left + size]
    return _normalise(crops)


def _randint(high: int, n: int, device: torch.device, generator: torch.Generator | None):
    """Drawn on the generator's device, then moved: a CPU generator works for a CUDA batch."""
    where = device if generator is None else generator.device
    return torch.randint(0, high, (n,), device=where, generator=generator).to(device)


def _normalise(crops: torch.Tensor) -> torch.Tensor:
    """uint8 -> ``(x / 255 - mean) / std`` in one multiply-add, contiguous float32."""
    mean = torch.tensor(IMAGENET_MEAN, device=crops.device)
    std = torch.tensor(IMAGENET_STD, device=crops.device)
    scale = (1.0 / (255.0 * std)).view(3, 1, 1)
    shift = (-mean / std).view(3, 1, 1)
    return torch.addcmul(shift, crops.float(), scale).contiguous()
