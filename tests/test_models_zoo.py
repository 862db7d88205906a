"""torchvision's video models and timm's BatchNorm families, recognised from keys alone.

Recognition reads only keys and shapes, so state dicts come from models built on the meta
device by the libraries themselves (``torch.device("meta")``, independent of the code under
test); building, the stem and the CLI use real, randomly initialised models.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torchvision
from helpers import run_inprocess
from safetensors.torch import save_file
from torch import Tensor, nn

import bnfix
from bnfix.errors import BnfixError
from bnfix.models import (
    adapt_stem,
    build_model,
    closest_model,
    is_builtin,
    recognise,
    stem_conv,
    stem_dimensions,
    stem_in_channels,
    timm_zoo,
    torchvision_zoo,
)

HAVE_TIMM = importlib.util.find_spec("timm") is not None
needs_timm = pytest.mark.skipif(not HAVE_TIMM, reason="timm is not installed (dev extra)")
if HAVE_TIMM:
    import timm


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny forwards gain nothing from threads on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _meta_timm(name: str, **kwargs: object) -> dict[str, Tensor]:
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return timm.create_model(name, pretrained=False, **kwargs).state_dict()


def _meta_tv(name: str, **kwargs: object) -> dict[str, Tensor]:
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torchvision.models.get_model(name, **kwargs).state_dict()


def _real_timm(name: str, **kwargs: object) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def _real_tv(name: str, **kwargs: object) -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.get_model(name, **kwargs).eval()


@functools.cache
def _shared(zoo: str, name: str) -> nn.Module:
    """One real model per module for the tests that only read it."""
    return _real_timm(name) if zoo == "timm" else _real_tv(name)


def _save(state: dict[str, Tensor], path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    return path


# --------------------------------------------------------------------------------------------
# Recognition from keys and shapes

TIMM_FAMILIES = [
    "efficientnet_b0",  # efficientnet
    "mobilenetv2_100",  # mobilenetv2 (timm's efficientnet module)
    "mixnet_s",  # mixnet: mixed depthwise kernels (conv_dw.convs.#)
    "mobilenetv3_large_100",  # mobilenetv3
    "resnet26",  # resnet: no torchvision counterpart
    "resnet50d",  # resnet-d: deep stem, avg-pool downsample
    "seresnet50",
    "regnetx_002",
    "regnety_008",
    "cspdarknet53",  # cspnet
    "darknet53",
    "cs3darknet_m",
    "densenet264d",  # densenet: deep stem, no torchvision counterpart
]


@needs_timm
@pytest.mark.parametrize("name", TIMM_FAMILIES)
def test_timm_family_is_recognised_by_its_exact_name(name: str) -> None:
    recognition = recognise(_meta_timm(name))
    assert recognition is not None
    assert (recognition.name, recognition.in_channels, recognition.num_classes) == (
        f"timm:{name}",
        3,
        1000,
    )


@needs_timm
def test_timm_audio_layout_and_headless_checkpoint() -> None:
    """The cross-modal changes: a 1-channel stem, a classifier removed or resized."""
    audio = recognise(_meta_timm("efficientnet_b0", in_chans=1, num_classes=0))
    assert audio is not None
    assert (audio.name, audio.in_channels, audio.num_classes) == ("timm:efficientnet_b0", 1, None)
    assert "1-channel stem (timm has 3)" in audio.notes
    assert "no classifier (classifier.* absent)" in audio.notes
    resized = recognise(_meta_timm("regnety_008", num_classes=10))
    assert resized is not None and (resized.name, resized.num_classes) == ("timm:regnety_008", 10)


@needs_timm
def test_timm_look_alikes_are_named() -> None:
    """tf_efficientnet_b0 has efficientnet_b0's keys and shapes: the note says so."""
    recognition = recognise(_meta_timm("tf_efficientnet_b0"))
    assert recognition is not None and recognition.name == "timm:efficientnet_b0"
    assert any("timm:tf_efficientnet_b0" in note for note in recognition.notes)


@needs_timm
@pytest.mark.parametrize("name", ["resnet50", "resnext50_32x4d", "densenet121"])
def test_torchvision_name_wins_when_both_zoos_fit(name: str) -> None:
    """timm's resnet50 has torchvision's keys and shapes: the torchvision name is reported."""
    recognition = recognise(_meta_timm(name))
    assert recognition is not None and recognition.name == name


@pytest.mark.parametrize("name", ["r3d_18", "mc3_18", "r2plus1d_18", "s3d"])
def test_video_model_is_recognised_by_its_exact_name(name: str) -> None:
    recognition = recognise(_meta_tv(name))
    assert recognition == bnfix.architectures.Recognition(name, 3, 400, ())
    assert is_builtin(name)


def test_video_heads_missing_or_resized() -> None:
    """R(2+1)D's classifier is ``fc``; S3D's is a 1×1×1 Conv3d (``classifier.1``)."""
    headless = {k: v for k, v in _meta_tv("r2plus1d_18").items() if not k.startswith("fc.")}
    recognition = recognise(headless)
    assert recognition is not None
    assert (recognition.name, recognition.num_classes) == ("r2plus1d_18", None)
    recognition = recognise(_meta_tv("s3d", num_classes=10))
    assert recognition is not None and (recognition.name, recognition.num_classes) == ("s3d", 10)
    audio = _meta_tv("r3d_18")
    audio["stem.0.weight"] = torch.empty(64, 1, 3, 7, 7, device="meta")
    recognition = recognise(audio)
    assert recognition is not None and (recognition.name, recognition.in_channels) == ("r3d_18", 1)


@needs_timm
def test_near_miss_says_how_it_differs_and_asks_for_arch() -> None:
    state = _meta_timm("resnet50d")
    del state["layer4.2.conv3.weight"]
    state["layer1.0.conv1.weight"] = torch.empty(64, 64, 3, 3, device="meta")
    assert recognise(state) is None
    hint = closest_model(state)
    assert hint is not None and hint.startswith("timm:resnet50d: 1 key missing")
    assert "layer1.0.conv1.weight: checkpoint [64, 64, 3, 3] vs model [64, 64, 1, 1]" in hint
    with pytest.raises(BnfixError) as error:
        build_model(state)
    message = str(error.value)
    assert "closest model timm:resnet50d: 1 key missing (e.g. layer4.2.conv3.weight)" in message
    assert "pass --arch" in message and "\n" not in message


@needs_timm
def test_forced_timm_arch_that_does_not_fit_says_how() -> None:
    with pytest.raises(BnfixError, match=r"--arch timm:resnet50d does not fit this checkpoint: "):
        build_model(_meta_timm("resnet26d"), arch="timm:resnet50d")
    with pytest.raises(BnfixError, match=r"timm cannot create it"):
        build_model(_meta_timm("resnet26d"), arch="timm:no_such_model")


@needs_timm
def test_another_timm_version_falls_back_to_families(monkeypatch: pytest.MonkeyPatch) -> None:
    """Signatures are trusted only for the catalogue's timm version; otherwise the family
    search (representatives, key counts) finds the same model."""
    monkeypatch.setattr(timm_zoo, "is_current", lambda: False)
    recognition = recognise(_meta_timm("resnet26d"))
    assert recognition is not None and recognition.name == "timm:resnet26d"


@needs_timm
@pytest.mark.parametrize("name", ["resnet26d", "mixnet_s", "cs3darknet_m", "regnetx_002"])
def test_catalogue_entries_match_the_installed_timm(name: str) -> None:
    """Spot checks; rewrite the catalogue with ``python -m bnfix.models.timm_zoo``."""
    version, _ = timm_zoo.catalogue()
    if version != timm.__version__:
        pytest.skip(f"catalogue written for timm {version}, installed {timm.__version__}")
    member = timm_zoo._members_by_name()[name]
    layout = timm_zoo.timm_layout(name)
    assert member.keys == len(layout.shapes)
    assert member.signature == timm_zoo.signature(layout.shapes, layout.stem_key, layout.head_keys)


@needs_timm
def test_representatives_cover_their_families_sampled() -> None:
    """The stored family patterns are the union of their members' (sampled: a few members)."""
    families = {f.name: f for f in timm_zoo.catalogue()[1]}
    for family, name in [("resnet", "resnet50d"), ("efficientnet", "mixnet_s")]:
        assert timm_zoo.timm_layout(name).patterns <= families[family].patterns


# --------------------------------------------------------------------------------------------
# Building with the checkpoint's weights; the stem


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        pytest.param("timm:efficientnet_b0", (1, 3, 64, 64), marks=needs_timm),
        ("r2plus1d_18", (1, 3, 4, 32, 32)),
    ],
)
def test_built_model_is_bit_exact_and_runs_like_the_original(
    name: str, shape: tuple[int, ...]
) -> None:
    zoo_name = name.removeprefix("timm:")
    original = _shared("timm" if name.startswith("timm:") else "tv", zoo_name)
    state = original.state_dict()
    model, recognition = build_model(state)
    assert recognition.name == name
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(x), original(x))


def test_stem_of_a_3d_model_is_adapted_for_audio() -> None:
    """An RGB Conv3d stem summed over its inputs sees a 1-channel clip as the RGB stem sees
    that clip repeated three times."""
    model = _real_tv("r3d_18")
    x = torch.randn(1, 1, 4, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(x.repeat(1, 3, 1, 1, 1))
    assert stem_conv(model)[0] == "stem.0" and stem_dimensions(model) == 3
    note = adapt_stem(model, 1)
    assert note == "stem.0: 3 -> 1 input channels (summed over RGB)"
    assert stem_in_channels(model) == 1
    assert model.stem[0].weight.shape == (64, 1, 3, 7, 7)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)


def test_stem_of_a_1d_model_is_adapted_for_images() -> None:
    """A 1-channel Conv1d stem repeated ÷3 sees RGB input as the original sees its mean."""
    torch.manual_seed(0)
    original = nn.Sequential(nn.Conv1d(1, 4, 5), nn.BatchNorm1d(4), nn.ReLU()).eval()
    model = nn.Sequential(nn.Conv1d(1, 4, 5), nn.BatchNorm1d(4), nn.ReLU()).eval()
    model.load_state_dict(original.state_dict())
    assert adapt_stem(model, 3) == "0: 1 -> 3 input channels (repeated ÷3)"
    assert stem_dimensions(model) == 1
    x = torch.randn(2, 3, 50, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x.mean(dim=1, keepdim=True)))


# --------------------------------------------------------------------------------------------
# End to end: bnfix scan (static) and bnfix.load


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, nn.Module]]:
    folder = tmp_path_factory.mktemp("zoo")
    video_model = _shared("tv", "r2plus1d_18")
    found = {
        "r2plus1d_18": (
            _save(video_model.state_dict(), folder / "r2plus1d.safetensors"),
            video_model,
        )
    }
    if HAVE_TIMM:
        timm_model = _shared("timm", "regnetx_002")
        found["timm:regnetx_002"] = (
            _save(timm_model.state_dict(), folder / "regnetx.pt"),
            timm_model,
        )
    return found


@pytest.mark.parametrize(
    "name", [pytest.param("timm:regnetx_002", marks=needs_timm), "r2plus1d_18"]
)
def test_static_scan_names_the_architecture(
    name: str, checkpoints: dict[str, tuple[Path, nn.Module]], tmp_path: Path
) -> None:
    path, _ = checkpoints[name]
    report = tmp_path / "scan.json"
    done = run_inprocess("scan", path, "--json", report)
    assert done.code == 0, done.stderr
    assert re.search(re.escape(name), done.stdout)
    doc = json.loads(report.read_text())["checkpoints"][0]
    assert doc["architecture"] == name


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        pytest.param("timm:regnetx_002", (1, 3, 64, 64), marks=needs_timm),
        ("r2plus1d_18", (1, 3, 4, 32, 32)),
    ],
)
def test_bnfix_load(
    name: str, shape: tuple[int, ...], checkpoints: dict[str, tuple[Path, nn.Module]]
) -> None:
    path, original = checkpoints[name]
    model = bnfix.load(path)
    assert type(model) is type(original) and not model.training
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(model(x), original(x))


def test_torchvision_zoo_lists_video_models() -> None:
    assert {"r3d_18", "mc3_18", "r2plus1d_18", "s3d"} <= torchvision_zoo.names()


@needs_timm
@pytest.mark.skipif(
    not os.environ.get("BNFIX_SLOW_TESTS"), reason="builds all ~370 models: BNFIX_SLOW_TESTS=1"
)
def test_every_catalogue_member_is_recognised() -> None:
    """Each member's own keys give its name back (its torchvision twin's where it has one)."""
    from bnfix.models import timm_catalogue

    wrong = {}
    for family in timm_zoo.catalogue()[1]:
        for member in family.members:
            state = timm_zoo.construct(member.name, ()).state_dict()
            want = timm_catalogue.TORCHVISION_TWINS.get(member.name, f"timm:{member.name}")
            recognition = recognise(state)
            got = None if recognition is None else recognition.name
            if got != want:
                wrong[member.name] = got
    assert not wrong


@needs_timm
def test_a_safetensors_file_is_scanned_in_the_models_layer_order(tmp_path: Path) -> None:
    """safetensors stores keys sorted by name, which put timm RegNet's ``stem.bn`` after every
    ``s1.*`` layer: the stem-gap rule then judged ``s1.b1.conv2.bn`` and the .safetensors
    file got another recommendation than the same weights as .bin. A probe scan lists the
    layers in the model's order, whatever the file's."""
    model = _real_timm("regnetx_002")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=generator))
                module.running_mean.copy_(0.3 * torch.randn(n, generator=generator))
                module.num_batches_tracked.fill_(100)
    state = model.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    torch.save(state, tmp_path / "pytorch_model.bin")
    probe = torch.randn(4, 3, 64, 64, generator=generator)
    torch.save(probe, tmp_path / "probe.pt")
    modules = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    docs = []
    for name in ("model.safetensors", "pytorch_model.bin"):
        out = tmp_path / f"{name}.json"
        done = run_inprocess(
            "scan", tmp_path / name, "--arch", "timm:regnetx_002", "--probe", tmp_path / "probe.pt",
            "--modality", "visual", "--json", out,
        )  # fmt: skip
        assert done.code == 0, done.stderr
        docs.append(json.loads(out.read_text())["checkpoints"][0])
    for doc in docs:
        assert [layer["name"] for layer in doc["layers"]] == modules
    assert modules[0] == "stem.bn"
    same = [{k: v for k, v in d["recommendation"].items() if k != "command"} for d in docs]
    assert same[0] == same[1]
    assert docs[0]["recommendation"]["stem_gap"]["name"] == "stem.bn"


@needs_timm
def test_a_multi_branch_stem_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    """timm's RepVGG reads the input with two parallel convolutions (3x3 and 1x1): repair
    summed only the first to one channel and wrote, with exit 0, a checkpoint that neither
    bnfix.load nor fold could run. It is one line and exit 2 now, nothing written."""
    from bnfix.models.stem import input_convolutions

    model = _real_timm("repvgg_a0")
    assert input_convolutions(model) == ["stem.conv_1x1.conv", "stem.conv_kxk.conv"]
    assert input_convolutions(_real_timm("resnet18d")) == ["conv1.0"]
    assert input_convolutions(_real_tv("densenet121")) == ["features.conv0"]
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "m.safetensors"
    )
    out = tmp_path / "m.abri.safetensors"
    done = run_inprocess("repair", tmp_path / "m.safetensors", "--arch", "timm:repvgg_a0",
                         "--modality", "audio", "--out", out)  # fmt: skip
    assert done.code == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "2 parallel convolutions reading the input" in lines[0]
    assert "stem.conv_kxk.conv" in lines[0] and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


@needs_timm
def test_non_persistent_buffers_keep_the_values_their_module_computed() -> None:
    """timm's densenetblur121d holds its BlurPool filter in a non-persistent buffer, which no
    state dict carries: built on the meta device, it stayed there, and scan --probe, repair
    and bnfix.load ended in a traceback ('tensors left on the meta device')."""
    original = _real_timm("densenetblur121d")
    model, recognition = build_model(original.state_dict(), "timm:densenetblur121d")
    assert recognition.name == "timm:densenetblur121d"
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x), original(x))
