"""Stage-2 masking: ratio rules against hand-computed values, exact batched patch masks, and the
tensor-side visual augmentation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF

from bnfix.errors import BnfixError
from bnfix.fusion.augment import IMAGENET_MEAN, IMAGENET_STD, visual_batch
from bnfix.fusion.masking import RULES, mask_patches, mask_ratios

# Five samples: audio easy, visual easy, a tie, both hard, audio easy again.
C_A = torch.tensor([0.90, 0.30, 0.80, 0.60, 0.70])
C_V = torch.tensor([0.50, 0.90, 0.80, 0.40, 0.20])
TAU, ETA, RHO = 0.65, (2.0, 3.0), (0.5, 0.8)


def _f32(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def test_adaptive_masks_the_modality_that_finds_the_sample_easy() -> None:
    r_a, r_v = mask_ratios(C_A, C_V, "adaptive", TAU, ETA, RHO)
    assert r_a.dtype == r_v.dtype == torch.float32
    expected_a = [0.5 * math.tanh(2 * 0.4), 0.0, 0.0, 0.0, 0.5 * math.tanh(2 * 0.5)]
    expected_v = [0.0, 0.8 * math.tanh(3 * 0.6), 0.0, 0.0, 0.0]
    torch.testing.assert_close(r_a, _f32(expected_a))
    torch.testing.assert_close(r_v, _f32(expected_v))
    # Never both modalities of one sample.
    assert not bool(((r_a > 0) & (r_v > 0)).any())


def test_mean_gives_every_sample_the_mean_adaptive_ratio() -> None:
    r_a, r_v = mask_ratios(C_A, C_V, "mean", TAU, ETA, RHO)
    mean_a = (0.5 * math.tanh(0.8) + 0.5 * math.tanh(1.0)) / 5
    mean_v = 0.8 * math.tanh(1.8) / 5
    torch.testing.assert_close(r_a, torch.full((5,), mean_a))
    torch.testing.assert_close(r_v, torch.full((5,), mean_v))


def test_none_is_zero() -> None:
    r_a, r_v = mask_ratios(C_A, C_V, "none", TAU, ETA, RHO)
    assert r_a.tolist() == [0.0] * 5 and r_v.tolist() == [0.0] * 5


def test_reference_follows_the_official_branch_order() -> None:
    # Official: if c_v >= tau: r_a = rho_a tanh(eta_a (c_a - c_v)); elif c_a >= tau: r_v = ...
    c_a = torch.tensor([0.90, 0.30, 0.80, 0.60, 0.95, 0.70])
    c_v = torch.tensor([0.50, 0.90, 0.80, 0.40, 0.70, 0.66])
    r_a, r_v = mask_ratios(c_a, c_v, "reference", TAU, ETA, RHO)
    # 0: c_v < tau, c_a >= tau -> second branch: r_v = tanh(<0) -> nothing (adaptive masks audio)
    # 1: c_v >= tau: r_a = tanh(2 (0.3 - 0.9)) < 0 -> nothing (adaptive masks visual)
    # 2: tie -> 0; 3: both below tau -> 0
    # 4, 5: both >= tau and audio higher: audio masked
    expected_a = [0.0, 0.0, 0.0, 0.0, 0.5 * math.tanh(2 * 0.25), 0.5 * math.tanh(2 * 0.04)]
    torch.testing.assert_close(r_a, _f32(expected_a))
    assert r_v.tolist() == [0.0] * 6


def test_reference_never_masks_the_visual_side() -> None:
    gen = torch.Generator().manual_seed(0)
    c_a, c_v = torch.rand(10_000, generator=gen), torch.rand(10_000, generator=gen)
    for tau in (0.0, 0.3, 0.9):
        r_a, r_v = mask_ratios(c_a, c_v, "reference", tau, (5.0, 5.0), (1.0, 1.0))
        assert float(r_v.abs().max()) == 0.0
        assert float(r_a.max()) > 0.0 and float(r_a.min()) >= 0.0
        # Audio is masked exactly when both reach tau and audio's confidence is higher.
        assert torch.equal(r_a > 0, (c_v >= tau) & (c_a > c_v))


def test_ratio_rules_reject_bad_input() -> None:
    with pytest.raises(BnfixError, match="unknown mask rule"):
        mask_ratios(C_A, C_V, "conf", TAU, ETA, RHO)
    with pytest.raises(BnfixError, match=r"\[0, 1\].*sample 1"):
        mask_ratios(torch.tensor([0.2, 1.5]), torch.tensor([0.1, 0.1]), "adaptive", TAU, ETA, RHO)
    with pytest.raises(BnfixError, match="rho"):
        mask_ratios(C_A, C_V, "adaptive", TAU, ETA, (1.5, 0.5))
    with pytest.raises(BnfixError, match="different numbers"):
        mask_ratios(C_A, C_V[:3], "adaptive", TAU, ETA, RHO)
    assert set(RULES) == {"adaptive", "mean", "none", "reference"}


# --- patches -----------------------------------------------------------------------------------


def _patch_view(x: torch.Tensor, ph: int, pw: int) -> torch.Tensor:
    """``[..., C, gh*ph, gw*pw]`` -> ``[..., gh*gw, C*ph*pw]``: one row per patch."""
    *lead, c, h, w = x.shape
    gh, gw = h // ph, w // pw
    p = x[..., : gh * ph, : gw * pw].reshape(*lead, c, gh, ph, gw, pw)
    n = len(lead)
    p = p.permute(*range(n), n + 1, n + 3, n, n + 2, n + 4)  # [..., gh, gw, c, ph, pw]
    return p.reshape(*lead, gh * gw, c * ph * pw)


def _zero_patches(x: torch.Tensor, ph: int, pw: int) -> torch.Tensor:
    """Per sample (and frame): how many patches are all zero; asserts no patch is half zeroed."""
    patches = _patch_view(x, ph, pw) == 0
    full, some = patches.all(-1), patches.any(-1)
    assert torch.equal(full, some), "a patch was partly zeroed"
    return full.sum(-1)


def test_audio_masks_exactly_floor_n_r_patches_per_sample() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(6, 1, 128, 64, generator=gen) + 0.5  # no zeros: zeros are the mask
    before = x.clone()
    ratios = torch.tensor([0.0, 0.1, 0.25, 0.5, 0.99, 1.0])
    out = mask_patches(x, ratios, (32, 8), generator=gen)
    assert torch.equal(x, before), "the input was modified"
    n = (128 // 32) * (64 // 8)  # 32 patches
    assert _zero_patches(out, 32, 8).tolist() == [math.floor(n * float(r)) for r in ratios]
    kept = out != 0
    assert torch.equal(out[kept], x[kept])  # everything else is untouched


def test_visual_masks_each_frame_independently_and_never_the_remainder() -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(4, 3, 3, 45, 47, generator=gen) + 0.5  # grid 4 x 4, remainder 5 and 7 px
    ratios = torch.tensor([0.5, 0.2, 0.0, 0.8])
    out = mask_patches(x, ratios, (10, 10), generator=gen)
    counts = _zero_patches(out, 10, 10)  # [B, T]
    expected = [[math.floor(16 * float(r))] * 3 for r in ratios]
    assert counts.tolist() == expected
    assert torch.equal(out[..., 40:, :], x[..., 40:, :])
    assert torch.equal(out[..., :, 40:], x[..., :, 40:])
    # Channels of one frame share the mask; frames of one sample draw their own.
    zero = out == 0
    assert torch.equal(zero[:, :, 0], zero[:, :, 1]) and torch.equal(zero[:, :, 0], zero[:, :, 2])
    assert not torch.equal(zero[0, 0], zero[0, 1])


def test_patch_count_is_exact_where_float32_would_round_up() -> None:
    n = 22 * 22  # the 224 x 224 image grid of 10 x 10 patches
    r = np.float32(0.61157024)
    assert math.floor(np.float32(n) * r) != math.floor(n * float(r))  # the trap is real
    x = torch.rand(1, 1, 3, 224, 224) + 0.5
    out = mask_patches(x, torch.tensor([float(r)], dtype=torch.float32), (10, 10))
    assert _zero_patches(out, 10, 10).item() == math.floor(n * float(r)) == 295


def test_masks_are_redrawn_and_reproducible_with_a_generator() -> None:
    x = torch.rand(8, 1, 64, 64) + 0.5
    ratios = torch.full((8,), 0.5)
    first, second = mask_patches(x, ratios, (8, 8)), mask_patches(x, ratios, (8, 8))
    assert not torch.equal(first == 0, second == 0)
    a = mask_patches(x, ratios, (8, 8), torch.Generator().manual_seed(5))
    b = mask_patches(x, ratios, (8, 8), torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_patches_are_drawn_uniformly() -> None:
    x = torch.ones(4000, 1, 16, 32)  # grid 4 x 4
    out = mask_patches(x, torch.full((4000,), 0.25), (4, 8), torch.Generator().manual_seed(3))
    hit = (_patch_view(out, 4, 8) == 0).all(-1).float().mean(0)  # per-patch frequency
    assert hit.shape == (16,)
    assert float((hit - 0.25).abs().max()) < 0.03  # 4 sigma of a binomial(4000, 0.25) is 0.027


def test_mask_patches_keeps_dtype_and_rejects_bad_ratios() -> None:
    x = torch.rand(2, 1, 32, 16, dtype=torch.bfloat16) + 0.5
    out = mask_patches(x, torch.tensor([0.5, 1.0]), (8, 8))
    assert out.dtype == torch.bfloat16 and _zero_patches(out, 8, 8).tolist() == [4, 8]
    nothing = mask_patches(x, torch.zeros(2), (8, 8))
    assert torch.equal(nothing, x) and nothing.data_ptr() != x.data_ptr()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mask_patches(x, torch.tensor([0.5, 1.5]), (8, 8))
    with pytest.raises(ValueError, match="one ratio per sample"):
        mask_patches(x, torch.tensor([0.5]), (8, 8))


# --- visual augmentation -----------------------------------------------------------------------


def _reference_normalise(x_uint8: torch.Tensor) -> torch.Tensor:
    x = TF.to_dtype(x_uint8, torch.float32, scale=True)
    return TF.normalize(x, list(IMAGENET_MEAN), list(IMAGENET_STD))


def test_eval_batch_is_torchvisions_centre_crop_and_normalisation() -> None:
    gen = torch.Generator().manual_seed(4)
    x = torch.randint(0, 256, (2, 3, 3, 13, 13), dtype=torch.uint8, generator=gen)
    out = visual_batch(x, 8, train=False, generator=None)
    assert out.shape == (2, 3, 3, 8, 8) and out.dtype == torch.float32
    expected = _reference_normalise(TF.center_crop(x.flatten(0, 1), [8, 8])).view(2, 3, 3, 8, 8)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_train_batch_crops_and_flips_each_sample_consistently_over_its_frames() -> None:
    gen = torch.Generator().manual_seed(6)
    x = torch.randint(0, 256, (64, 3, 3, 12, 12), dtype=torch.uint8, generator=gen)
    out = visual_batch(x, 8, train=True, generator=gen)
    assert out.shape == (64, 3, 3, 8, 8)
    seen = set()
    for b in range(64):
        matches = []
        for top in range(5):
            for left in range(5):
                for flip in (False, True):
                    crop = x[b, :, :, top : top + 8, left : left + 8]
                    crop = crop.flip(-1) if flip else crop
                    ref = _reference_normalise(crop)
                    if torch.allclose(out[b], ref, atol=1e-5):  # all T frames at once
                        matches.append((top, left, flip))
        assert len(matches) == 1, f"sample {b} is not one crop of its frames: {matches}"
        seen.add(matches[0])
    assert {flip for _, _, flip in seen} == {False, True}
    assert len(seen) > 20  # offsets vary between samples
    again = visual_batch(x, 8, True, torch.Generator().manual_seed(7))
    assert not torch.equal(again, out)
