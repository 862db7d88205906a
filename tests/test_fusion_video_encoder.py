"""3-D visual encoders in fusion-tune: a video backbone sees the clip [B, 3, T, H, W] once,
renormalised to the Kinetics statistics, behind the same masks, exports and stage 2.

Real torchvision video models (no weights downloaded), small clips (T <= 4, 32 pixels); the
reference for every number is the bare backbone fed by hand.
"""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

import pytest
import torch
import torchvision
from helpers import TINY, fusion_toml
from rich.console import Console
from torch import nn

from bnfix.checkpoint import load_checkpoint
from bnfix.fusion import masking
from bnfix.fusion.augment import IMAGENET_MEAN, IMAGENET_STD
from bnfix.fusion.config import load_config
from bnfix.fusion.model import (
    Encoder,
    FusionModel,
    UniModal,
    build_encoder,
    export_stage1,
    load_stage1_encoder,
)
from bnfix.fusion.run import fusion_tune
from bnfix.fusion.synthetic import tiny_cnn, write_synthetic_av
from bnfix.probe_clip import KINETICS_MEAN, KINETICS_STD


def by_hand(x: torch.Tensor) -> torch.Tensor:
    """[B, T, 3, H, W] ImageNet-normalised -> [B, 3, T, H, W] Kinetics-normalised, written out."""
    shape = (1, 1, 3, 1, 1)
    mean_i, std_i = (
        torch.tensor(v, dtype=x.dtype).view(shape) for v in (IMAGENET_MEAN, IMAGENET_STD)
    )
    mean_k, std_k = (
        torch.tensor(v, dtype=x.dtype).view(shape) for v in (KINETICS_MEAN, KINETICS_STD)
    )
    pixels = x * std_i + mean_i
    return ((pixels - mean_k) / std_k).permute(0, 2, 1, 3, 4)


@pytest.fixture(scope="module")
def r3d() -> Encoder:
    torch.manual_seed(0)
    encoder, info = build_encoder("visual", "r3d_18", "scratch", (3, 32, 32), frames=4)
    assert (info.dim, encoder.head_path, encoder.head_kernel) == (512, "fc", ())
    assert encoder.video and encoder.temporal
    assert isinstance(encoder.backbone.fc, nn.Identity)
    return encoder


def test_a_3d_encoder_takes_the_clip_once_and_trains(r3d: Encoder) -> None:
    torch.manual_seed(1)
    x = torch.randn(2, 4, 3, 32, 32)
    r3d.train()
    features = r3d(x)
    assert features.shape == (2, 512)
    features.square().mean().backward()
    stem = r3d.backbone.stem[0]
    assert isinstance(stem, nn.Conv3d) and stem.weight.grad is not None
    assert float(stem.weight.grad.abs().sum()) > 0
    assert all(p.grad is not None for p in r3d.parameters())
    r3d.zero_grad(set_to_none=True)
    r3d.eval()
    try:
        with torch.no_grad():
            one = x[:1]
            plain = r3d(one)
            hand = r3d.backbone(by_hand(one))  # the permute and renormalisation, written out
            swapped = r3d(one.flip(1))  # frame order matters to a 3-D encoder
            r3d.to_channels_last()  # as CUDA runs use
            assert r3d.backbone.stem[0].weight.is_contiguous(memory_format=torch.channels_last_3d)
            last = r3d(one)
    finally:
        r3d.channels_last = False
        r3d.to(memory_format=torch.contiguous_format).train()
    assert r3d.memory_format == torch.channels_last_3d
    assert torch.allclose(plain, hand, rtol=0, atol=1e-5)
    assert torch.allclose(last, plain, rtol=0, atol=1e-4)
    assert not torch.allclose(swapped, plain, atol=1e-3)


def test_a_2d_encoder_still_pools_frames_and_goes_channels_last_in_4d() -> None:
    torch.manual_seed(6)
    encoder, _ = build_encoder("visual", TINY, "scratch", (3, 16, 16), frames=3)
    assert not encoder.video and encoder.memory_format == torch.channels_last
    x = torch.randn(2, 3, 3, 16, 16)
    encoder.eval()
    with torch.no_grad():
        pooled = encoder(x)
        frames = torch.stack([encoder.backbone(x[:, t]) for t in range(3)]).mean(0)
        encoder.to_channels_last()
        last = encoder(x)
    assert encoder.backbone[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(pooled, frames, atol=1e-6) and torch.allclose(last, pooled, atol=1e-5)


def test_visual_masks_reach_a_3d_encoder_frame_by_frame(r3d: Encoder) -> None:
    """Masks are drawn per frame on [B, T, 3, H, W], before the encoder: the clip the backbone
    sees has each frame's floor(N r) patches at the ImageNet mean colour, in Kinetics units."""
    torch.manual_seed(3)
    x = torch.randn(2, 4, 3, 32, 32)
    ratios = torch.tensor([0.5, 0.0])
    masked = masking.mask_patches(x, ratios, (10, 10), torch.Generator().manual_seed(0))
    seen = []
    hook = r3d.backbone.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            r3d.eval()(masked)
    finally:
        hook.remove()
        r3d.train()
    (clip,) = seen
    assert clip.shape == (2, 3, 4, 32, 32)
    grey = by_hand(torch.zeros(1, 1, 3, 1, 1))[0, :, 0]  # a masked pixel: the ImageNet mean
    n = (32 // 10) ** 2
    for t in range(4):
        frame = masked[0, t]
        hidden = (frame[:, :30, :30] == 0).all(0).unflatten(0, (3, 10)).unflatten(2, (3, 10))
        patches = hidden.all(1).all(-1)  # [3, 3] patch grid: masked patches of this frame
        assert int(patches.sum()) == int(masking.patch_counts(ratios, n)[0]) == 4
        inside = clip[0, :, t, :30, :30].unflatten(1, (3, 10)).unflatten(3, (3, 10))
        expected = grey.view(3, 1, 1)
        for i, j in patches.nonzero().tolist():
            assert torch.allclose(inside[:, i, :, j, :], expected.expand(3, 10, 10), atol=1e-6)
    assert torch.allclose(clip[1], by_hand(x)[1], atol=1e-6)  # ratio 0: nothing hidden


def test_a_3d_checkpoint_initialises_the_encoder_and_a_conv_classifier_exports_as_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(4)
    stock = torchvision.models.video.mc3_18(num_classes=5)
    torch.save(stock.state_dict(), tmp_path / "mc3.pt")
    encoder, info = build_encoder("visual", "auto", tmp_path / "mc3.pt", (3, 16, 16), frames=2)
    assert encoder.video and info.dim == 512 and info.arch == "auto"
    own = encoder.backbone.state_dict()
    assert all(torch.equal(own[k], v) for k, v in stock.state_dict().items() if k in own)
    assert set(stock.state_dict()) - set(own) == {"fc.weight", "fc.bias"}

    # A 1x1x1 convolutional classifier (s3d's layout) comes off, and goes back in its shape.
    def conv_head() -> nn.Module:
        return nn.Sequential(
            nn.Conv3d(3, 8, 3, padding=1), nn.BatchNorm3d(8), nn.ReLU(),
            nn.AdaptiveAvgPool3d(1), nn.Conv3d(8, 6, 1), nn.Flatten(),
        )  # fmt: skip

    module = types.ModuleType("bnfix_test_conv_head")
    module.conv_head = conv_head  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    arch = "bnfix_test_conv_head:conv_head"
    encoder, info = build_encoder("visual", arch, "scratch", (3, 8, 8), frames=2)
    assert (encoder.head_path, encoder.head_kernel, info.dim) == ("4", (1, 1, 1), 8)
    model = UniModal(encoder, classes=3)
    state = export_stage1(model)
    assert state["4.weight"].shape == (3, 8, 1, 1, 1)
    stock = conv_head()
    stock[4] = nn.Conv3d(8, 3, 1)
    stock.load_state_dict(state)  # the stock layout, strictly
    x = torch.randn(2, 2, 3, 8, 8)
    model.eval()
    stock.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), stock(encoder.clip(x)), atol=1e-6)
    fresh, _ = build_encoder("visual", arch, "scratch", (3, 8, 8), frames=2)
    head = load_stage1_encoder(fresh, state)
    assert torch.equal(head.weight, model.head.weight)


CHANGES = {
    "model": {"visual_arch": "mc3_18"},
    "stage1": {"lr": 0.01, "momentum": 0.0},
    "stage2": {"lr": 0.01, "momentum": 0.0},
}


def test_fusion_tune_with_an_mc3_18_visual_encoder_runs_both_stages(tmp_path: Path) -> None:
    manifest = write_synthetic_av(
        tmp_path / "data", classes=2, per_class=5, seed=2, seconds=0.3, image_size=24, frames=2
    )
    config = tmp_path / "fusion.toml"
    config.write_text(fusion_toml(manifest, CHANGES))
    summary = fusion_tune(load_config(config), console=Console(quiet=True), plot=False)
    out = tmp_path / "out"
    assert set(summary["stage2"]["test"]) == {"fused", "audio", "visual"}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in records] == ["stage1/audio", "stage1/visual", "stage2"]
    # Stage 1's visual export is a stock mc3_18 checkpoint with 2 outputs.
    stock = torchvision.models.video.mc3_18(num_classes=2)
    stock.load_state_dict(
        load_checkpoint(out / "stage1" / "visual" / "best.safetensors").state_dict
    )
    # Stage 2's joint model, rebuilt by hand: the tiny CNN on spectrograms, the bare mc3_18 on
    # the hand-permuted, Kinetics-normalised clip, the concatenated head. Float64.
    joint = load_checkpoint(out / "stage2" / "best.safetensors").state_dict
    audio = tiny_cnn()
    audio[0] = nn.Conv2d(1, 16, 3, 2, 1, bias=False)
    audio[-1] = nn.Identity()
    audio.load_state_dict({k[6:]: v for k, v in joint.items() if k.startswith("audio.")})
    video = torchvision.models.video.mc3_18()
    video.fc = nn.Identity()
    video.load_state_dict({k[7:]: v for k, v in joint.items() if k.startswith("visual.")})
    head = nn.Linear(64 + 512, 2)
    head.load_state_dict({"weight": joint["head.weight"], "bias": joint["head.bias"]})
    model = FusionModel(
        Encoder(audio, 64, temporal=False, head_path="6"),
        Encoder(video, 512, temporal=True, head_path="fc", video=True),
        classes=2,
    )
    model.head = head
    torch.manual_seed(5)
    a = torch.randn(3, 1, 32, 16, dtype=torch.float64)
    v = torch.randn(3, 2, 3, 16, 16, dtype=torch.float64)
    model.double().eval()
    with torch.no_grad():
        logits, _, _ = model(a, v)
        expected = head(torch.cat([audio(a), video(by_hand(v))], dim=1))
    assert torch.allclose(logits, expected, rtol=0, atol=1e-10)


@pytest.mark.skipif(
    not os.environ.get("BNFIX_SLOW_TESTS"), reason="s3d at 16 x 224 x 224: BNFIX_SLOW_TESTS=1"
)
def test_fusion_tune_with_an_s3d_visual_encoder_exports_its_conv_classifier(tmp_path: Path) -> None:
    """torchvision's s3d (a 1x1x1 Conv3d classifier; it needs 16 frames of 224 pixels, ~25 s
    on one core) through both stages: stage 1's visual export loads into a stock s3d with 2
    outputs, strictly, and the joint head sees its 1024 features."""
    manifest = write_synthetic_av(
        tmp_path / "data", classes=2, per_class=3, seed=1, seconds=0.3, image_size=64,
        frames=16, splits=("train", "val", "test"),
    )  # fmt: skip
    changes = {
        "data.visual": {"frames": 16, "size": 224},
        "model": {"visual_arch": "s3d"},
        "stage1": {"batch_size": 4, "lr": 0.01, "momentum": 0.0},
        "stage2": {"batch_size": 4, "lr": 0.01, "momentum": 0.0},
        "mask": {"visual_patch": [16, 16]},
    }
    config = tmp_path / "fusion.toml"
    config.write_text(fusion_toml(manifest, changes))
    summary = fusion_tune(load_config(config), console=Console(quiet=True), plot=False)
    assert set(summary["stage2"]["test"]) == {"fused", "audio", "visual"}
    out = tmp_path / "out"
    stock = torchvision.models.video.s3d(num_classes=2)
    state = load_checkpoint(out / "stage1" / "visual" / "best.safetensors").state_dict
    assert state["classifier.1.weight"].shape == (2, 1024, 1, 1, 1)
    stock.load_state_dict(state)
    joint = load_checkpoint(out / "stage2" / "best.safetensors").state_dict
    assert joint["head.weight"].shape == (2, 64 + 1024)
