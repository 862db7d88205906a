"""Stage-2 input masking of Fusion Tuning: per-sample mask ratios and batched patch masks.

Stage 1 leaves, for every training sample, each modality's mean confidence (true-class softmax
probability). Stage 2 then hides patches of the input of the modality that finds the sample
*easy*, so the joint model has to learn from the other one (the paper's Fig. 4). The ratio is
fixed for a run; the patches are redrawn every time a sample is seen.

Masks are generated for a whole batch at once on the batch's device: the official code zeroes
one patch at a time in a Python loop per sample, which costs more than the forward pass of a
ResNet-18 on a GPU.
"""

from __future__ import annotations

import math

import torch

from bnfix.errors import BnfixError

__all__ = [
    "AUDIO_PATCH",
    "RULES",
    "VISUAL_PATCH",
    "check_parameters",
    "check_patch",
    "mask_patches",
    "mask_ratios",
    "patch_counts",
]

RULES = ("adaptive", "mean", "none", "reference")
#: Spectrogram patches: 32 frames x 8 mel bins (the official code's).
AUDIO_PATCH = (32, 8)
#: Image patches, per video frame: 10 x 10 pixels.
VISUAL_PATCH = (10, 10)
#: Confidences a rounding step outside [0, 1] (a mean of float32 softmax values) are accepted.
_SLACK = 1e-6


def mask_ratios(
    conf_audio: torch.Tensor,
    conf_visual: torch.Tensor,
    rule: str,
    tau: float,
    eta: tuple[float, float],
    rho: tuple[float, float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample mask ratios ``(r_audio, r_visual)``, float32 in [0, 1], from mean confidences.

    ``eta`` and ``rho`` are ``(audio, visual)``. For modality m with confidence c_m and the
    other modality's c_o:

    - ``adaptive``: ``r_m = rho_m * tanh(eta_m * (c_m - c_o))`` when ``c_m >= tau`` and
      ``c_m > c_o``, else 0: only the modality that finds the sample easier is masked, and only
      when it finds it easy in absolute terms.
    - ``mean``: every sample gets the mean over all given samples of the ``adaptive`` ratios, per
      modality (the paper's ablation: same amount of masking, not targeted).
    - ``none``: zeros (plain joint training).
    - ``reference``: the official code's literal branch order::

          if c_v >= tau:   r_a = rho_a * tanh(eta_a * (c_a - c_v)); r_v = 0
          elif c_a >= tau: r_a = 0; r_v = rho_v * tanh(eta_v * (c_v - c_a))
          else:            r_a = r_v = 0

      and a ratio <= 0 masks nothing there. In the second branch c_v < tau <= c_a, so r_v is
      never positive: the visual side is never masked, and the audio side only when *both*
      confidences reach tau and audio's is higher. Negative values are clipped to 0 here, which
      masks exactly what the official code masks.
    """
    if rule not in RULES:
        raise BnfixError(f"unknown mask rule {rule!r}; use one of {', '.join(RULES)}")
    _check_parameters(tau, eta, rho)
    c_a = _confidences(conf_audio, "audio")
    c_v = _confidences(conf_visual, "visual")
    if c_a.shape != c_v.shape:
        raise BnfixError(
            f"audio and visual confidences cover different numbers of samples "
            f"({c_a.numel()} vs {c_v.numel()})"
        )
    (eta_a, eta_v), (rho_a, rho_v) = eta, rho
    zero = torch.zeros_like(c_a)
    if rule == "none":
        return zero, zero.clone()
    if rule == "reference":
        audio_branch = c_v >= tau
        visual_branch = ~audio_branch & (c_a >= tau)
        r_a = torch.where(audio_branch, rho_a * torch.tanh(eta_a * (c_a - c_v)), zero)
        r_v = torch.where(visual_branch, rho_v * torch.tanh(eta_v * (c_v - c_a)), zero)
        return _as_ratio(r_a), _as_ratio(r_v)
    r_a = _adaptive(c_a, c_v, tau, eta_a, rho_a)
    r_v = _adaptive(c_v, c_a, tau, eta_v, rho_v)
    if rule == "mean":
        r_a = torch.full_like(r_a, float(r_a.double().mean())) if r_a.numel() else r_a
        r_v = torch.full_like(r_v, float(r_v.double().mean())) if r_v.numel() else r_v
    return _as_ratio(r_a), _as_ratio(r_v)


def _adaptive(c_m: torch.Tensor, c_o: torch.Tensor, tau: float, eta: float, rho: float):
    easy = (c_m >= tau) & (c_m > c_o)
    return torch.where(easy, rho * torch.tanh(eta * (c_m - c_o)), torch.zeros_like(c_m))


def _as_ratio(r: torch.Tensor) -> torch.Tensor:
    return r.clamp(0.0, 1.0).to(torch.float32)


def _confidences(c: torch.Tensor, name: str) -> torch.Tensor:
    c = torch.as_tensor(c)
    if c.ndim != 1:
        raise BnfixError(f"{name} confidences must be one value per sample, not {list(c.shape)}")
    c = c.detach().to(torch.float64)  # differences of nearby confidences: no float32 rounding
    bad = ~((c >= -_SLACK) & (c <= 1 + _SLACK))  # also catches NaN
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        raise BnfixError(
            f"{name} confidences must lie in [0, 1]; {int(bad.sum())} do not "
            f"(first: sample {first}: {float(c[first])})"
        )
    return c.clamp(0.0, 1.0)


def check_parameters(tau: float, eta: tuple[float, float], rho: tuple[float, float]) -> None:
    """Refuse a threshold, slopes or maxima :func:`mask_ratios` cannot use (one line each)."""
    _check_parameters(tau, eta, rho)


def check_patch(patch: tuple[int, int], size: tuple[int, int], option: str, where: str) -> None:
    """Refuse a patch size with no whole patch in the ``size`` (height, width) input: such a
    mask would silently hide nothing. ``option`` names the setting, ``where`` the input."""
    ph, pw = patch
    if ph < 1 or pw < 1:
        raise BnfixError(f"{option} must be two positive sizes, got {list(patch)}")
    if size[0] // ph == 0 or size[1] // pw == 0:
        raise BnfixError(
            f"{option} {list(patch)} is larger than {where} ({size[0]}x{size[1]}): no patch "
            "fits, so nothing could be masked; use a smaller patch"
        )


def _check_parameters(tau: float, eta: tuple[float, float], rho: tuple[float, float]) -> None:
    if not (0.0 <= tau <= 1.0):
        raise BnfixError(f"mask threshold tau must lie in [0, 1] (got {tau})")
    for name, pair in (("eta", eta), ("rho", rho)):
        if len(pair) != 2:
            raise BnfixError(f"mask {name} needs two values (audio, visual), got {list(pair)}")
    for value in eta:
        if not (math.isfinite(value) and value >= 0):
            raise BnfixError(f"mask eta values must be non-negative numbers (got {list(eta)})")
    for value in rho:
        if not (0.0 <= value <= 1.0):
            raise BnfixError(f"mask rho values must lie in [0, 1] (got {list(rho)})")


def mask_patches(
    x: torch.Tensor,
    ratios: torch.Tensor,
    patch: tuple[int, int],
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A copy of ``x`` with ``floor(N * r_b)`` random patches of each sample (and frame) zeroed.

    ``x`` is ``[B, C, H, W]`` (audio: C=1, H=time, W=mel) or ``[B, T, C, H, W]`` (video frames,
    each frame masked independently, all channels alike). The grid is ``floor(H/ph) x
    floor(W/pw)`` patches from the top-left corner (a remainder strip is never masked, as in the
    official code), N is its size. Patches are drawn without replacement by ranking uniform
    random keys, so no Python loop runs per sample. Keys are drawn on ``generator``'s device
    (then moved: they are small), so a CPU generator works for a CUDA batch too.
    """
    if x.ndim not in (4, 5):
        raise ValueError(f"mask_patches takes [B, C, H, W] or [B, T, C, H, W], not {list(x.shape)}")
    ph, pw = patch
    if ph < 1 or pw < 1:
        raise ValueError(f"patch sizes must be positive, got {patch}")
    batch, height, width = x.shape[0], x.shape[-2], x.shape[-1]
    ratios = torch.as_tensor(ratios)
    if ratios.shape != (batch,):
        raise ValueError(f"need one ratio per sample ({batch}), got shape {list(ratios.shape)}")
    gh, gw = height // ph, width // pw
    n_patches = gh * gw
    counts = _patch_counts(ratios, n_patches, x.device)
    if x.device.type == "cpu":
        invalid, anything = torch.stack([(counts < 0).any(), (counts > 0).any()]).tolist()
        if invalid:
            raise ValueError(f"mask ratios must lie in [0, 1], got {ratios.tolist()[:8]}")
        if not anything:  # eval batches, rule "none": no mask work
            return x.clone()
    else:  # no host sync per batch on an accelerator: the check runs on the device
        torch._assert_async((counts >= 0).all(), "mask ratios must lie in [0, 1]")
    frames = x.shape[1] if x.ndim == 5 else 1
    rows = batch * frames
    keys = _uniform((rows, n_patches), x.device, generator)
    order = keys.argsort(dim=1)  # a uniformly random permutation of the patches, per row
    chosen = torch.arange(n_patches, device=x.device) < counts.repeat_interleave(frames)[:, None]
    hidden = torch.empty_like(chosen).scatter_(1, order, chosen)  # [rows, N] patch is masked
    grid = hidden.view(*x.shape[:-3], 1, gh, 1, gw, 1)  # broadcast over channels and pixels
    if gh * ph == height and gw * pw == width:
        blocks = x.unflatten(-1, (gw, pw)).unflatten(-3, (gh, ph))
        return torch.where(grid, 0.0, blocks).flatten(-4, -3).flatten(-2, -1).to(x.dtype)
    out = x.clone()
    region = out[..., : gh * ph, : gw * pw].unflatten(-1, (gw, pw)).unflatten(-3, (gh, ph))
    region.masked_fill_(grid, 0.0)
    return out


def _uniform(
    shape: tuple[int, ...], device: torch.device, generator: torch.Generator | None
) -> torch.Tensor:
    where = device if generator is None else generator.device
    return torch.rand(shape, device=where, generator=generator).to(device, non_blocking=True)


def patch_counts(ratios: torch.Tensor, n_patches: int) -> torch.Tensor:
    """Patches :func:`mask_patches` zeroes per sample (and frame) for these ratios, on the CPU:
    ``floor(N * r)``, computed exactly as the masks are (statistics must match what happens)."""
    return _patch_counts(torch.as_tensor(ratios).cpu(), n_patches, torch.device("cpu"))


def _patch_counts(ratios: torch.Tensor, n_patches: int, device: torch.device) -> torch.Tensor:
    """``floor(N * r)`` per sample, exact for every float32 ratio; -1 marks a ratio outside [0, 1].

    A float32 product ``N * r`` can round up onto an integer that the true product falls just
    short of, giving one patch too many; the product of a float32 and an int below 2^29 is exact
    in float64, so its floor is the true one.
    """
    exact = ratios.detach()
    if exact.device.type == "mps":  # no float64 on Apple GPUs; B numbers are cheap to move
        exact = exact.cpu()
    exact = exact.to(torch.float64)
    counts = torch.floor(exact * n_patches).to(torch.int64)
    return torch.where((exact >= 0) & (exact <= 1), counts, -1).to(device)  # -1: invalid ratio
