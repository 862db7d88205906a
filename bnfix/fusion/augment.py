"""Visual augmentation on stored uint8 frames, batched on the training device.

The feature store holds frames once, decoded and resized: by default centre-cropped squares a
little larger than the training crop (``S = round(size * 8 / 7)``, 256 for 224: the ImageNet
resize/crop ratio), so per-epoch augmentation is a crop, a flip and a normalisation of a batch
just read: no image decoding per epoch and no Python loop per sample on the device.
:func:`visual_whole_batch` does the same for whole frames (``RandomResizedCrop``, full-frame
evaluation), with crops drawn in each source frame's own proportions.
"""

from __future__ import annotations

import math

import torch

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "visual_batch", "visual_whole_batch"]

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
        if device.type == "cpu":  # slices are memcpy on the CPU; a gather is 10x slower there
            crops = torch.stack([
                _crop(x_uint8[b], int(top[b]), int(left[b]), size, bool(flip[b]))
                for b in range(batch)
            ])  # fmt: skip
            return _normalise(crops)
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


def _crop(clip: torch.Tensor, top: int, left: int, size: int, flip: bool) -> torch.Tensor:
    crop = clip[..., top : top + size, left : left + size]
    return crop.flip(-1) if flip else crop


def _drawn_on(generator: torch.Generator | None, device: torch.device) -> torch.device:
    """Draws happen on the generator's device, then move: a CPU generator works for a CUDA
    batch."""
    return device if generator is None else generator.device


def _randint(high: int, n: int, device: torch.device, generator: torch.Generator | None):
    where = _drawn_on(generator, device)
    return torch.randint(0, high, (n,), device=where, generator=generator).to(device)


def _normalise(crops: torch.Tensor) -> torch.Tensor:
    """uint8 -> ``(x / 255 - mean) / std`` in one multiply-add, contiguous float32."""
    mean = torch.tensor(IMAGENET_MEAN, device=crops.device)
    std = torch.tensor(IMAGENET_STD, device=crops.device)
    scale = (1.0 / (255.0 * std)).view(3, 1, 1)
    shift = (-mean / std).view(3, 1, 1)
    out = crops.to(torch.float32, memory_format=torch.contiguous_format)
    return out.mul_(scale).add_(shift)  # in place: one float tensor allocated, not two


# --- whole frames: crops drawn in the source frame's proportions ---------------------------------

#: torchvision's RandomResizedCrop defaults: the official FusT/OGM-GE training transform.
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)
RRC_ATTEMPTS = 10


def visual_whole_batch(
    x_uint8: torch.Tensor,
    aspect: torch.Tensor,
    size: int,
    train: bool,
    generator: torch.Generator | None = None,
    crop: str = "random-resized",
    eval_resize: str = "full-frame",
) -> torch.Tensor:
    """``[B, T, 3, S, S]`` whole frames (squashed to squares; ``aspect`` = source width/height
    per sample) -> ``[B, T, 3, size, size]`` float32, ImageNet-normalised.

    Crops are boxes in the source frame's normalised coordinates, so a ``RandomResizedCrop``
    drawn here has the scale and aspect-ratio distribution torchvision's has on the original
    frame; the box is then resampled from the stored square (``roi_align``: bilinear with
    adaptive averaging, antialiased when shrinking). ``crop``: ``"random-resized"`` (one crop
    per frame, as the official code transforms each frame on its own) or ``"fixed-scale"``
    (a ``size/S`` square of the shorter side, one place and flip per sample). ``eval_resize``:
    ``"full-frame"`` (the whole frame resized to size x size, aspect not kept) or
    ``"center-crop"`` (the centre square, as the square layout's evaluation).
    """
    from torchvision.ops import roi_align

    if x_uint8.ndim != 5 or x_uint8.shape[2] != 3 or x_uint8.dtype != torch.uint8:
        raise ValueError(f"visual_whole_batch takes uint8 [B, T, 3, S, S], not {x_uint8.shape}")
    batch, frames, _, side, _ = x_uint8.shape
    device = x_uint8.device
    flat = x_uint8.reshape(batch * frames, 3, side, side).float()
    a = aspect.to(device=device, dtype=torch.float32).repeat_interleave(frames)
    if not train and eval_resize == "full-frame":
        out = torch.nn.functional.interpolate(
            flat, size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
        return _normalise(out.round_().clamp_(0, 255).view(batch, frames, 3, size, size))
    if train and crop == "random-resized":
        w, h, u, v = _rrc_boxes(a, generator, device)
        flip = _draw(generator, (batch * frames,), device) < 0.5
    else:
        fraction = size / side  # the crop's share of the stored square (224 of 256)
        w = torch.where(a >= 1, fraction / a, torch.full_like(a, fraction))
        h = torch.where(a >= 1, torch.full_like(a, fraction), fraction * a)
        if train:  # one place and one flip per sample, for all its frames
            u = (_draw(generator, (batch,), device).repeat_interleave(frames)) * (1 - w)
            v = (_draw(generator, (batch,), device).repeat_interleave(frames)) * (1 - h)
            flip = (_draw(generator, (batch,), device) < 0.5).repeat_interleave(frames)
        else:
            u, v = (1 - w) / 2, (1 - h) / 2
            flip = torch.zeros_like(a, dtype=torch.bool)
    index = torch.arange(batch * frames, device=device, dtype=torch.float32)
    boxes = torch.stack([index, u * side, v * side, (u + w) * side, (v + h) * side], dim=1)
    out = roi_align(flat, boxes, output_size=(size, size), spatial_scale=1.0, aligned=True)
    out = torch.where(flip[:, None, None, None], out.flip(-1), out)
    return _normalise(out.round_().clamp_(0, 255).view(batch, frames, 3, size, size))


def _draw(generator: torch.Generator | None, shape: tuple[int, ...], device: torch.device):
    where = _drawn_on(generator, device)
    return torch.rand(shape, device=where, generator=generator).to(device)


def _rrc_boxes(aspect: torch.Tensor, generator: torch.Generator | None, device: torch.device):
    """torchvision's RandomResizedCrop in normalised coordinates, for every frame at once.

    Its rejection loop (10 draws of scale and log-ratio, the first that fits) is drawn in one
    go; frames with no fitting draw fall back, as torchvision does, to the largest centred box
    of a ratio within bounds. Widths and heights are fractions of the frame's own sides.
    """
    n = aspect.numel()
    low, high = math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1])
    scale = RRC_SCALE[0] + (RRC_SCALE[1] - RRC_SCALE[0]) * _draw(
        generator, (n, RRC_ATTEMPTS), device
    )
    ratio = torch.exp(low + (high - low) * _draw(generator, (n, RRC_ATTEMPTS), device))
    a = aspect[:, None]
    w = torch.sqrt(scale * ratio / a)
    h = torch.sqrt(scale * a / ratio)
    fits = (w <= 1) & (h <= 1)
    first = torch.where(
        fits.any(1), fits.float().argmax(1), torch.zeros(n, dtype=torch.long, device=device)
    )
    pick = first[:, None]
    w, h = w.gather(1, pick)[:, 0], h.gather(1, pick)[:, 0]
    ok = fits.any(1)
    # Fallback: whole frame, narrowed to the ratio bounds (source pixels: width/height = ratio).
    fw = torch.where(aspect > RRC_RATIO[1], RRC_RATIO[1] / aspect, torch.ones_like(aspect))
    fh = torch.where(aspect < RRC_RATIO[0], aspect / RRC_RATIO[0], torch.ones_like(aspect))
    w, h = torch.where(ok, w, fw), torch.where(ok, h, fh)
    u = _draw(generator, (n,), device) * (1 - w)
    v = _draw(generator, (n,), device) * (1 - h)
    u = torch.where(ok, u, (1 - w) / 2)
    v = torch.where(ok, v, (1 - h) / 2)
    return w, h, u, v
