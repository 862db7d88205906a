"""``bnfix fold`` on inputs it must accept (Inception-v3, half precision, tuple outputs), the
precision ``bnfix repair`` writes, and 16-bit / float images decoded to 8 bits by scaling."""

from __future__ import annotations

import copy
import struct
import sys
import textwrap
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from helpers import one_error_line, run_inprocess
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import bnfix
from bnfix.abri import convert, fold
from bnfix.errors import BnfixError
from bnfix.fusion.features import decode_frame
from bnfix.probe import load_probe
from bnfix.probe_image import (
    ImageDecodeError,
    ImageOptions,
    decode_rgb,
    image_features,
    read_image,
)
from bnfix.repair_run import FOLD_TOLERANCE

HALF = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
        return tensors, dict(f.metadata() or {})


def randomise_bn(state: dict[str, torch.Tensor], seed: int = 0) -> None:
    """Give every BN (and ABRi twin, and α) non-trivial values, so a fold is a real computation."""
    g = torch.Generator().manual_seed(seed)
    for key, value in state.items():
        if not value.is_floating_point() or value.dim() != 1:
            continue
        leaf = key.rsplit(".", 1)[-1]
        if leaf == "alpha":
            new = torch.rand(value.shape, generator=g)
        elif leaf == "running_var" or (leaf == "weight" and f"{key[:-6]}running_var" in state):
            new = torch.rand(value.shape, generator=g) + 0.5
        elif leaf == "running_mean" or (leaf == "bias" and f"{key[:-4]}running_var" in state):
            new = torch.randn(value.shape, generator=g) * 0.2
        else:
            continue
        state[key] = new.to(value.dtype)


def repair(ckpt: Path, out: Path, *extra: str | Path) -> None:
    run = run_inprocess("repair", ckpt, "--modality", "visual", "--out", out, *extra)
    assert run.code == 0, run.stderr
    assert out.exists()


def perturb_abri_file(path: Path) -> None:
    """α and the twins away from their fresh values, as after fine-tuning; metadata kept."""
    state, metadata = read_safetensors(path)
    randomise_bn(state, seed=1)
    save_file(state, str(path), metadata)


# ------------------------------------------------------------------- fold: input size, dtype


def test_fold_inception_v3_uses_an_input_size_it_accepts(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False)
    state = model.state_dict()
    randomise_bn(state)
    torch.save(state, tmp_path / "inception.pt")
    abri = tmp_path / "inception.abri.safetensors"
    repair(tmp_path / "inception.pt", abri)
    perturb_abri_file(abri)
    out = tmp_path / "inception.folded.safetensors"
    run = run_inprocess("fold", abri, "--out", out)
    assert run.code == 0, run.stderr
    folded, metadata = read_safetensors(out)
    assert not any(".alpha" in k or ".additional." in k for k in folded)
    assert float(metadata["fold_max_deviation"]) <= FOLD_TOLERANCE
    # 64×64 is too small for Inception-v3 (it needs 75); the next size tried is used
    assert "float64, on random 4×3×96×96 inputs" in metadata["fold_verified"]


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
def test_fold_half_precision_writes_its_dtype_and_verifies_in_float32(
    tmp_path: Path, dtype_name: str
) -> None:
    dtype = HALF[dtype_name]
    torch.manual_seed(0)
    state = torchvision.models.resnet18(num_classes=10).state_dict()
    randomise_bn(state)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    torch.save(state, tmp_path / "half.pt")
    abri = tmp_path / "half.abri.safetensors"
    repair(tmp_path / "half.pt", abri)  # no --probe: the repaired file stays half precision
    perturb_abri_file(abri)
    out = tmp_path / "half.folded.safetensors"
    run = run_inprocess("fold", abri, "--out", out)
    assert run.code == 0, run.stderr

    folded, metadata = read_safetensors(out)
    repaired, _ = read_safetensors(abri)
    assert {v.dtype for v in folded.values() if v.is_floating_point()} == {dtype}
    assert metadata["dtype"] == dtype_name
    assert torch.equal(folded["conv1.weight"], repaired["conv1.weight"])  # bit-exact
    # the fold maths is held to the float32 tolerance; the rounding to half is reported
    assert float(metadata["fold_max_deviation"]) <= FOLD_TOLERANCE
    rounding = float(metadata["fold_written_deviation"])
    assert 0 < rounding < (5e-3 if dtype == torch.float16 else 3e-2)
    assert "in float64" in metadata["fold_verified"]
    assert f"written as {dtype_name}" in metadata["fold_verified"]

    # the written model, run in float32, is the ABRi model up to that rounding
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = bnfix.load(abri).float()(x)
        got = bnfix.load(out).float()(x)
    assert float((got - want).abs().max()) <= 4 * rounding * float(want.abs().max())


@pytest.mark.parametrize(
    ("dtype_name", "probe"),
    [("float16", "none"), ("float16", "recalibrate"), ("bfloat16", "probe"),
     ("float64", "probe"), ("float64", "recalibrate")],
)  # fmt: skip
def test_repair_writes_the_input_dtype(tmp_path: Path, dtype_name: str, probe: str) -> None:
    """Half precision survives the probe's float32 round trip; float64 did not (every tensor
    rounded to float32 once a probe was given): it is probed as a float32 copy instead."""
    dtype = {**HALF, "float64": torch.float64}[dtype_name]
    torch.manual_seed(0)
    source = torchvision.models.resnet18(num_classes=10).state_dict()
    randomise_bn(source)
    source = {k: v.to(dtype) if v.is_floating_point() else v for k, v in source.items()}
    if dtype == torch.float64:  # digits float32 cannot hold
        source = {k: v + 1e-9 * v.sign() if v.is_floating_point() else v for k, v in source.items()}
    torch.save(source, tmp_path / "half.pt")
    extra: list[str | Path] = []
    if probe != "none":
        torch.save(torch.randn(8, 3, 32, 32), tmp_path / "probe.pt")
        extra = ["--probe", tmp_path / "probe.pt", "--batch-size", "4"]
        extra += ["--recalibrate"] if probe == "recalibrate" else []
    out = tmp_path / "half.abri.safetensors"
    repair(tmp_path / "half.pt", out, *extra)

    written, metadata = read_safetensors(out)
    assert {v.dtype for v in written.values() if v.is_floating_point()} == {dtype}
    assert metadata["dtype"] == dtype_name
    for key in ("conv1.weight", "layer3.1.conv2.weight", "fc.weight", "fc.bias"):
        assert torch.equal(written[key], source[key]), key  # bit-exact
    if probe != "recalibrate":
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            assert torch.equal(
                written[f"layer1.0.bn1.original.{leaf}"], source[f"layer1.0.bn1.{leaf}"]
            )
    else:
        assert not torch.equal(
            written["bn1.original.running_mean"], source["bn1.running_mean"]
        )  # re-estimated in float32, stored in the checkpoint's precision


def test_repair_refuses_statistics_float16_cannot_hold(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = torchvision.models.resnet18(num_classes=10).state_dict()
    torch.save(
        {k: v.half() if v.is_floating_point() else v for k, v in source.items()}, tmp_path / "h.pt"
    )
    torch.save(torch.randn(8, 3, 32, 32) * 1000, tmp_path / "loud.pt")  # variances ≫ 65504
    out = tmp_path / "h.abri.safetensors"
    args = ["--probe", tmp_path / "loud.pt", "--recalibrate", "--batch-size", "4"]
    run = run_inprocess("repair", tmp_path / "h.pt", "--modality", "visual", "--out", out, *args)
    assert run.code == 2
    line = one_error_line(run.stderr)
    assert "h.pt: " in line and "beyond the range of float16" in line and "not written" in line
    assert not out.exists()


# ---------------------------------------------------------------- fold: what the model returns

FACTORY_SOURCE = """
from collections import namedtuple

import torch
from torch import nn

Out = namedtuple("Out", "logits extra")


class TwoHeads(nn.Module):
    '''Eval forward returns a named tuple holding a tensor and a dict of tensors.'''

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 5)
        self.aux = nn.Linear(8, 3)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        y = torch.relu(self.bn2(self.conv2(x)))
        pooled = y.mean((2, 3))
        return Out(self.head(pooled), {"aux": self.aux(x.mean((2, 3))), "map": y})


class FixedSize(nn.Module):
    '''Runs on 100×100 inputs only: no size the fold check tries fits.'''

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 10, stride=10)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8 * 10 * 10, 4)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).flatten(1))
"""


@pytest.fixture
def factory_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    name = "bnfix_fold_factories"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(FACTORY_SOURCE))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    yield name
    sys.modules.pop(name, None)


def _factory_checkpoint(tmp_path: Path, spec: str) -> Path:
    from bnfix.architectures import create_model

    torch.manual_seed(0)
    state = create_model(spec).state_dict()
    randomise_bn(state)
    path = tmp_path / "net.pt"
    torch.save(state, path)
    return path


def test_fold_verifies_a_model_returning_a_named_tuple(tmp_path: Path, factory_module: str) -> None:
    spec = f"{factory_module}:TwoHeads"
    ckpt = _factory_checkpoint(tmp_path, spec)
    abri = tmp_path / "net.abri.safetensors"
    repair(ckpt, abri, "--arch", spec)
    perturb_abri_file(abri)
    out = tmp_path / "net.folded.safetensors"
    run = run_inprocess("fold", abri, "--out", out, "--arch", spec)
    assert run.code == 0, run.stderr
    _, metadata = read_safetensors(out)
    deviation = float(metadata["fold_max_deviation"])
    assert 0 < deviation <= FOLD_TOLERANCE  # a real comparison, over every returned tensor


def test_fold_refuses_in_one_line_when_no_input_size_fits(
    tmp_path: Path, factory_module: str
) -> None:
    spec = f"{factory_module}:FixedSize"
    ckpt = _factory_checkpoint(tmp_path, spec)
    abri = tmp_path / "fixed.abri.safetensors"
    repair(ckpt, abri, "--arch", spec)
    out = tmp_path / "fixed.folded.safetensors"
    run = run_inprocess("fold", abri, "--out", out, "--arch", spec)
    assert run.code == 2
    line = one_error_line(run.stderr)
    assert "cannot verify the fold" in line and "64, 96, 128, 224, 299" in line
    assert "not written" in line
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".") or "tmp" in p.name]


# ------------------------------------------------------------------ 16-bit and float images

#: 16-bit levels where a saturating conversion (→ 255) and a truncating one (v >> 8) are wrong.
LEVELS = np.array(
    [[0, 128, 129, 257, 383, 1000, 32767, 32896], [40000, 50000, 65000, 65278, 65535, 7, 3000, 9]],
    dtype=np.uint16,
)


def expected8(v: np.ndarray) -> np.ndarray:
    return np.round(v.astype(np.float64) / 257).astype(np.uint8)


def write_png16(path: Path, array: np.ndarray) -> Path:
    """A 16-bit PNG written byte by byte (Pillow cannot write 16-bit colour PNGs)."""
    h, w = array.shape[:2]
    channels = 1 if array.ndim == 2 else array.shape[2]
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    rows = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )
    return path


def pixels_through_probe(path: Path) -> np.ndarray:
    """The probe transform at the image's own size (resize and crop are no-ops), undone."""
    opts = ImageOptions(size=min(LEVELS.shape), resize=min(LEVELS.shape))
    x = read_image(path, opts)
    mean, std = torch.tensor(opts.mean)[:, None, None], torch.tensor(opts.std)[:, None, None]
    return torch.round((x * std + mean) * 255).to(torch.uint8).permute(1, 2, 0).numpy()


def test_16bit_greyscale_png_is_scaled_not_saturated(tmp_path: Path) -> None:
    path = tmp_path / "grey16.png"
    Image.fromarray(LEVELS).save(path)
    with Image.open(path) as im:
        assert im.mode == "I;16"  # a real 16-bit PNG, as Pillow reads it
    want = np.repeat(expected8(LEVELS)[:, :, None], 3, axis=2)

    decoded = decode_rgb(path)
    assert decoded.dtype == torch.uint8 and decoded.shape == (3, *LEVELS.shape)
    np.testing.assert_array_equal(decoded.permute(1, 2, 0).numpy(), want)
    # probes and fusion frames decode it the same way
    np.testing.assert_array_equal(pixels_through_probe(path), want[:, 3:5])  # centre crop 2×2
    frame = decode_frame(path, min(LEVELS.shape)).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(frame, want[:, 3:5])
    probe = load_probe(tmp_path, "visual", 8, image=ImageOptions())
    pixels = torch.from_numpy(want).permute(2, 0, 1).contiguous()
    assert torch.equal(probe.tensor[0], image_features(pixels, ImageOptions()))


@pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities of TorchVision")
@pytest.mark.parametrize("channels", [3, 4, 2])
def test_16bit_colour_pngs_are_rounded_from_full_depth(tmp_path: Path, channels: int) -> None:
    planes = [LEVELS, (LEVELS // 3), (65535 - LEVELS), LEVELS[::-1]][:channels]
    array = np.stack(planes, axis=2)
    path = write_png16(tmp_path / f"colour{channels}.png", array)
    colour = array[:, :, :3] if channels >= 3 else np.repeat(array[:, :, :1], 3, axis=2)
    want = expected8(colour)  # alpha dropped, grey repeated
    np.testing.assert_array_equal(decode_rgb(path).permute(1, 2, 0).numpy(), want)
    frame = decode_frame(path, min(LEVELS.shape)).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(frame, want[:, 3:5])


def test_32bit_integer_and_float_images_are_scaled(tmp_path: Path) -> None:
    top = 2**31 - 1
    ints = np.array([[0, top, top // 2, -5], [top // 255, 1, 2**30, 70000]], dtype=np.int32)
    Image.fromarray(ints).save(tmp_path / "i32.tiff")
    with Image.open(tmp_path / "i32.tiff") as im:
        assert im.mode == "I"
    want = np.round(ints.clip(0, None) / top * 255).astype(np.uint8)
    np.testing.assert_array_equal(decode_rgb(tmp_path / "i32.tiff")[0].numpy(), want)

    unit = (LEVELS / 65535).astype(np.float32)  # a [0, 1] float image
    Image.fromarray(unit).save(tmp_path / "unit.tiff")
    with Image.open(tmp_path / "unit.tiff") as im:
        assert im.mode == "F"
    np.testing.assert_array_equal(
        decode_rgb(tmp_path / "unit.tiff")[1].numpy(), np.round(unit * 255).astype(np.uint8)
    )
    wide = np.array([[0.0, 17.4, 254.6, 300.0]], dtype=np.float32)  # Pillow's 0-255 scale
    Image.fromarray(wide).save(tmp_path / "wide.tiff")
    np.testing.assert_array_equal(
        decode_rgb(tmp_path / "wide.tiff")[2].numpy(), [[0, 17, 255, 255]]
    )

    Image.fromarray(np.array([[0.5, np.nan]], dtype=np.float32)).save(tmp_path / "nan.tiff")
    with pytest.raises(ImageDecodeError, match="NaN"):
        decode_rgb(tmp_path / "nan.tiff")


def test_undecodable_images_keep_their_messages(tmp_path: Path) -> None:
    good = write_png16(tmp_path / "good.png", LEVELS).read_bytes()
    (tmp_path / "cut.png").write_bytes(good[: len(good) // 2])
    with pytest.raises(BnfixError, match=r"^cannot decode image: "):
        read_image(tmp_path / "cut.png", ImageOptions())
    with pytest.raises(BnfixError, match=r"^cannot decode image cut\.png: "):
        decode_frame(tmp_path / "cut.png", 8)
    # A video named where frames are expected is decoded as one (PyAV): a broken one says so.
    from bnfix.fusion.kinds import VisualKind, VisualOptions

    (tmp_path / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")
    with pytest.raises(BnfixError, match=r"^cannot open video: "):
        VisualKind(VisualOptions()).compute(tmp_path / "clip.mp4")


def test_the_fold_is_verified_in_float64_so_float32_cancellation_is_not_blamed_on_it() -> None:
    """A network whose output cancels (two nearly equal branches subtracted, after a BN with
    tiny variances) runs in float32 1e-2 off its own float64 outputs, so comparing the ABRi
    and folded models in float32 refused a correct fold (timm's mixnet_s, recalibrated on a
    small probe, was 6.5e-3). Checked in float64 the fold is exact to 1e-10; the written
    model's float32 deviation is recorded, not held against it."""
    from bnfix.repair_run import verify_fold

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 2, 1, bias=False), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(2, 1, bias=False),
    )  # fmt: skip
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model[1].running_var.copy_(torch.rand(8, generator=g) * 1e-4 + 1e-5)
        model[1].running_mean.copy_(torch.randn(8, generator=g))
        model[3].weight[1] = model[3].weight[0] * (1 + 1e-5)
        model[6].weight.copy_(torch.tensor([[1.0, -1.0]]))
        convert(model, alpha=0.5)
        model[1].additional.running_var.copy_(torch.rand(8, generator=g) * 1e-4 + 1e-5)
        model[1].additional.running_mean.copy_(torch.randn(8, generator=g))
    model.eval()
    folded = fold(copy.deepcopy(model))
    x = torch.randn(4, 1, 32, 32, generator=g)
    with torch.no_grad():
        in_float32 = float((model(x) - folded(x)).abs().max() / model(x).abs().max())
    assert in_float32 > 1e-3  # what the float32 check compared
    check = verify_fold(model, folded, 1)
    assert check.deviation < 1e-9
    assert check.written_deviation > 1e-3  # float32 arithmetic, recorded


def test_a_video_model_that_needs_16_frames_is_verified_on_16() -> None:
    """The fold's random input had 8 frames for every 3-D model; torchvision's s3d pools over
    2 steps of an 8-times-shorter time axis and runs on no 8-frame input, so it could never
    be folded."""
    from bnfix.repair_run import verify_fold

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv3d(3, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(),
        nn.AvgPool3d((16, 2, 2)), nn.Flatten(), nn.Linear(4 * 32 * 32, 3),
    )  # fmt: skip
    convert(model)
    model.eval()
    check = verify_fold(model, fold(copy.deepcopy(model)), 3, sizes=(64,))
    assert check.shape == (4, 3, 16, 64, 64) and check.deviation < 1e-9
