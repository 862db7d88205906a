"""Recognising and building torchvision classifiers from state dicts (real models, no mocks).

Recognition only reads keys and shapes, so the whole catalogue is checked on meta-device state
dicts; building is checked on real, randomly initialised models, whose outputs the built model
must reproduce exactly.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
import textwrap
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
import torch
import torchvision
from helpers import run_inprocess
from torch import Tensor, nn

from bnfix.architectures import (
    Recognition,
    build_model,
    empty_weights,
    recognise,
    stem_in_channels,
)
from bnfix.checkpoint import load_checkpoint
from bnfix.errors import BnfixError
from bnfix.models import torchvision_zoo

CATALOGUE = [
    *("resnet18", "resnet34", "resnet50", "resnet101", "resnet152"),
    *("resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d"),
    *("wide_resnet50_2", "wide_resnet101_2"),
    *("mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small"),
    *(f"efficientnet_b{i}" for i in range(8)),
    *("efficientnet_v2_s", "efficientnet_v2_m", "efficientnet_v2_l"),
    *(
        f"regnet_{kind}_{size}"
        for kind in "xy"
        for size in ("400mf", "800mf", "1_6gf", "3_2gf", "8gf", "16gf", "32gf")
    ),
    "regnet_y_128gf",
    *("densenet121", "densenet161", "densenet169", "densenet201"),
    *("vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn"),
    *("mnasnet0_5", "mnasnet0_75", "mnasnet1_0", "mnasnet1_3"),
    *("shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "shufflenet_v2_x1_5", "shufflenet_v2_x2_0"),
    *("googlenet", "inception_v3"),
]

ModelFactory = Callable[..., nn.Module]


def _tv(name: str, **kwargs: object) -> nn.Module:
    """A real torchvision model with seeded random weights, in eval mode."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torchvision.models.get_model(name, **kwargs).eval()


def _meta_state_dict(name: str, **kwargs: object) -> dict[str, Tensor]:
    """Keys and shapes of a torchvision model without allocating its weights.

    ``torch.device("meta")`` is independent of the code under test; RegNet cannot be built
    under it (it computes widths with torch ops), so it uses ``empty_weights``.
    """
    context: AbstractContextManager[object] = (
        empty_weights() if name.startswith("regnet") else torch.device("meta")
    )
    with context, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torchvision.models.get_model(name, **kwargs).state_dict()


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny forwards gain nothing from threads, and on a busy 2-core machine OpenMP's
    barriers made a DenseNet forward take 5 s instead of 30 ms."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def real() -> ModelFactory:
    """Real torchvision models, each built once per module (building is the slow part)."""
    cache: dict[tuple[str, tuple[tuple[str, object], ...]], nn.Module] = {}

    def get(name: str, **kwargs: object) -> nn.Module:
        key = (name, tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = _tv(name, **kwargs)
        return cache[key]

    return get


def _assert_same_weights(model: nn.Module, state_dict: dict[str, Tensor]) -> None:
    """Every checkpoint tensor is in the model unchanged: same dtype, same bits."""
    built = model.state_dict()
    for key, tensor in state_dict.items():
        assert built[key].dtype == tensor.dtype, key
        assert torch.equal(built[key], tensor), key


def _assert_ready(model: nn.Module) -> None:
    """On the CPU, in eval mode, and nothing left on the meta device."""
    assert not model.training
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        assert tensor.device.type == "cpu", name


class TinyNet(nn.Module):
    """An unrelated CNN: a checkpoint of it must not be mistaken for a torchvision model."""

    def __init__(self, in_channels: int = 3, classes: int = 4) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 8, 3, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(8, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


# --------------------------------------------------------------------------------------------
# Recognition from keys and shapes


@pytest.mark.parametrize("name", CATALOGUE)
def test_recognises_every_catalogue_model_by_its_exact_name(name: str) -> None:
    recognition = recognise(_meta_state_dict(name))
    assert recognition is not None
    assert (recognition.name, recognition.in_channels, recognition.num_classes) == (
        name,
        3,
        1000,
    )


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b3", "regnet_x_1_6gf", "vgg16_bn"])
def test_stock_models_have_no_notes(name: str) -> None:
    assert recognise(_meta_state_dict(name)) == Recognition(name, 3, 1000, ())


@pytest.mark.parametrize("name", ["googlenet", "inception_v3"])
def test_auxiliary_classifiers_are_optional(name: str) -> None:
    with_aux = recognise(_meta_state_dict(name))
    without = recognise(_meta_state_dict(name, aux_logits=False))
    assert with_aux is not None and without is not None
    assert with_aux.name == without.name == name
    assert any("auxiliary" in note for note in with_aux.notes)
    assert not any("auxiliary" in note for note in without.notes)


def test_audio_resnet18_layout_is_recognised_with_notes(real: ModelFactory) -> None:
    audio = _audio_resnet18(real("resnet18"))
    state_dict = audio.state_dict()
    assert not any(k.startswith("fc.") for k in state_dict)
    recognition = recognise(state_dict)
    assert recognition is not None
    assert recognition.name == "resnet18"
    assert recognition.in_channels == 1
    assert recognition.num_classes is None
    assert "1-channel stem (torchvision has 3)" in recognition.notes
    assert "no classifier (fc.* absent)" in recognition.notes
    assert any("paper's official audio ResNet-18" in note for note in recognition.notes)


def _audio_resnet18(image_model: nn.Module) -> nn.Module:
    """The paper's audio ResNet-18 layout: summed 1-channel stem, classifier removed."""
    audio = _tv("resnet18")
    audio.load_state_dict(image_model.state_dict())
    stem = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    with torch.no_grad():
        stem.weight.copy_(audio.conv1.weight.sum(dim=1, keepdim=True))
    audio.conv1 = stem
    audio.fc = nn.Identity()
    return audio.eval()


def test_other_classifier_size_is_recognised() -> None:
    state_dict = _meta_state_dict("resnet50", num_classes=10)
    recognition = recognise(state_dict)
    assert recognition is not None
    assert (recognition.name, recognition.num_classes) == ("resnet50", 10)
    assert "classifier has 10 outputs (torchvision: 1000)" in recognition.notes


def test_other_classifier_size_resizes_auxiliary_heads_too() -> None:
    recognition = recognise(_meta_state_dict("googlenet", num_classes=10))
    assert recognition is not None
    assert (recognition.name, recognition.num_classes) == ("googlenet", 10)


@pytest.mark.parametrize("name", ["efficientnet_b0", "densenet121", "mobilenet_v3_small"])
def test_stem_and_head_are_found_without_key_names(name: str) -> None:
    """Stem ``features.0.0`` / ``features.conv0`` and head ``classifier.*`` need no table."""
    state_dict = _meta_state_dict(name, num_classes=7)
    layout = torchvision_zoo.torchvision_layout(name, ())
    assert layout.stem_key is not None and layout.head is not None
    shape = state_dict[layout.stem_key].shape
    state_dict[layout.stem_key] = torch.empty(shape[0], 2, *shape[2:], device="meta")
    recognition = recognise(state_dict)
    assert recognition is not None
    assert (recognition.name, recognition.in_channels, recognition.num_classes) == (name, 2, 7)


def test_unrelated_model_is_not_recognised() -> None:
    state_dict = TinyNet().state_dict()
    assert recognise(state_dict) is None
    with pytest.raises(BnfixError, match="--arch"):
        build_model(state_dict)


def test_empty_state_dict_is_not_recognised() -> None:
    assert recognise({}) is None


def test_near_miss_names_the_closest_model() -> None:
    state_dict = {
        k: v for k, v in _meta_state_dict("resnet50").items() if not k.startswith("layer4.2.")
    }
    assert recognise(state_dict) is None
    with pytest.raises(BnfixError, match=r"closest model resnet50: \d+ keys missing"):
        build_model(state_dict)


def test_half_precision_checkpoint_is_noted(real: ModelFactory) -> None:
    state_dict = {k: v.half() if v.is_floating_point() else v for k, v in _sd(real, "resnet18")}
    model, recognition = build_model(state_dict)
    assert recognition.name == "resnet18"
    assert any("float16" in note for note in recognition.notes)
    assert model.conv1.weight.dtype == torch.float16


def _sd(real: ModelFactory, name: str, **kwargs: object) -> list[tuple[str, Tensor]]:
    return list(real(name, **kwargs).state_dict().items())


# --------------------------------------------------------------------------------------------
# Building with the checkpoint's weights

BUILD_CASES = [
    ("resnet18", {}, 64),
    ("resnet50", {}, 64),
    ("mobilenet_v2", {}, 64),
    ("mobilenet_v3_small", {}, 64),
    ("efficientnet_b0", {}, 64),
    ("regnet_x_400mf", {}, 64),
    ("regnet_y_400mf", {}, 64),
    ("densenet121", {}, 64),
    ("vgg11_bn", {}, 32),
    ("mnasnet0_5", {}, 64),
    ("shufflenet_v2_x0_5", {}, 64),
    ("googlenet", {"num_classes": 10}, 64),
    ("inception_v3", {"aux_logits": False}, 80),
]


@pytest.mark.parametrize(("name", "kwargs", "size"), BUILD_CASES, ids=[c[0] for c in BUILD_CASES])
def test_built_model_is_bit_exact_and_runs_like_torchvision(
    real: ModelFactory, name: str, kwargs: dict[str, object], size: int
) -> None:
    original = real(name, **kwargs)
    state_dict = original.state_dict()
    model, recognition = build_model(state_dict)
    assert recognition.name == name
    _assert_same_weights(model, state_dict)
    _assert_ready(model)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(x), original(x))


def test_built_model_shares_the_checkpoint_tensors(real: ModelFactory) -> None:
    state_dict = real("resnet18").state_dict()
    model, _ = build_model(state_dict)
    assert model.conv1.weight.data_ptr() == state_dict["conv1.weight"].data_ptr()


def test_audio_resnet18_builds_and_runs_like_the_original(real: ModelFactory) -> None:
    audio = _audio_resnet18(real("resnet18"))
    state_dict = audio.state_dict()
    model, recognition = build_model(state_dict)
    assert (recognition.in_channels, recognition.num_classes) == (1, None)
    assert stem_in_channels(model) == 1
    assert isinstance(model.fc, nn.Identity)
    _assert_same_weights(model, state_dict)
    _assert_ready(model)
    x = torch.randn(2, 1, 128, 96, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        features = model(x)
        assert features.shape == (2, 512)
        assert torch.equal(features, audio(x))


def test_ten_class_head_builds_and_runs_like_the_original(real: ModelFactory) -> None:
    original = real("resnet18", num_classes=10)
    state_dict = original.state_dict()
    model, recognition = build_model(state_dict)
    assert recognition.num_classes == 10
    assert "classifier has 10 outputs (torchvision: 1000)" in recognition.notes
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(model(x), original(x))


def test_old_checkpoint_without_batch_counters(real: ModelFactory) -> None:
    """torchvision's 2018 mobilenet_v2 file has no ``num_batches_tracked`` keys."""
    state_dict = {k: v for k, v in _sd(real, "mobilenet_v2") if "num_batches_tracked" not in k}
    model, recognition = build_model(state_dict)
    assert recognition.name == "mobilenet_v2"
    assert any("num_batches_tracked" in note for note in recognition.notes)
    counters = [b for n, b in model.named_buffers() if n.endswith("num_batches_tracked")]
    assert counters and all(c.dtype == torch.long and int(c) == 0 for c in counters)
    _assert_same_weights(model, state_dict)
    _assert_ready(model)


def test_legacy_densenet_key_names(real: ModelFactory) -> None:
    """Pre-0.3 DenseNet files say ``denselayer1.norm.1.weight``; torchvision remaps them."""
    original = real("densenet121")
    modern = re.compile(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.")
    legacy = {modern.sub(r"\1.\2.", k): v for k, v in original.state_dict().items()}
    assert "features.denseblock1.denselayer1.norm.1.weight" in legacy
    model, recognition = build_model(legacy)
    assert recognition.name == "densenet121"
    assert any("legacy DenseNet" in note for note in recognition.notes)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(model(x), original(x))


# --------------------------------------------------------------------------------------------
# A forced architecture


def test_forced_torchvision_arch_that_fits(real: ModelFactory) -> None:
    model, recognition = build_model(real("resnet18").state_dict(), arch="resnet18")
    assert recognition.name == "resnet18"
    _assert_ready(model)


def test_forced_torchvision_arch_that_does_not_fit_says_how(real: ModelFactory) -> None:
    resnet18 = set(real("resnet18").state_dict())
    resnet34 = set(_meta_state_dict("resnet34"))
    missing = len({k for k in resnet34 - resnet18 if "num_batches_tracked" not in k})
    with pytest.raises(BnfixError) as error:
        build_model(real("resnet18").state_dict(), arch="resnet34")
    message = str(error.value)
    assert "resnet34" in message
    assert f"{missing} keys missing (e.g. layer" in message
    assert "0 keys unexpected" in message
    assert "\n" not in message


def test_forced_torchvision_model_outside_the_catalogue(real: ModelFactory) -> None:
    """SqueezeNet has no BatchNorm (not recognised), but can still be named explicitly."""
    original = real("squeezenet1_1")
    state_dict = original.state_dict()
    assert recognise(state_dict) is None
    model, recognition = build_model(state_dict, arch="squeezenet1_1")
    assert recognition.name == "squeezenet1_1"
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(model(x), original(x))


def test_unknown_arch_name() -> None:
    with pytest.raises(BnfixError, match="unknown architecture 'resnet19'"):
        build_model(TinyNet().state_dict(), arch="resnet19")


FACTORY_SOURCE = """
import torch
from torch import nn

CONSTANT = 3


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.body(x))

    @classmethod
    def create(cls):
        return cls()


def make():
    return TinyNet()


class Wrapped(nn.Module):
    # the whole network in one attribute named like a wrapper's prefix
    def __init__(self):
        super().__init__()
        self.encoder = TinyNet()

    def forward(self, x):
        return self.encoder(x)


def make_int():
    return 3


def broken():
    raise ValueError("no weights here\\nsecond line")
"""


@pytest.fixture
def factory_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A user module on sys.path, removed from the import cache afterwards."""
    name = "bnfix_test_factory"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(FACTORY_SOURCE))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    yield name
    sys.modules.pop(name, None)


@pytest.mark.parametrize("target", ["make", "TinyNet.create"])
def test_factory_adapts_stem_and_classifier(factory_module: str, target: str) -> None:
    torch.manual_seed(0)
    original = TinyNet(in_channels=1, classes=7).eval()
    state_dict = original.state_dict()
    spec = f"{factory_module}:{target}"
    model, recognition = build_model(state_dict, arch=spec)
    assert (recognition.name, recognition.in_channels, recognition.num_classes) == (spec, 1, 7)
    assert f"1-channel stem ({spec} has 3)" in recognition.notes
    assert f"classifier has 7 outputs ({spec}: 4)" in recognition.notes
    assert stem_in_channels(model) == 1
    _assert_same_weights(model, state_dict)
    _assert_ready(model)
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch.equal(model(x), original(x))


def test_factory_without_classifier(factory_module: str) -> None:
    state_dict = {k: v for k, v in TinyNet().state_dict().items() if not k.startswith("head.")}
    model, recognition = build_model(state_dict, arch=f"{factory_module}:make")
    assert recognition.num_classes is None
    assert "no classifier (head.* absent)" in recognition.notes
    assert model(torch.zeros(1, 3, 8, 8)).shape == (1, 8)


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("", "expected pkg.module:factory"),
        ("missing", "has no attribute 'missing'"),
        ("CONSTANT", "not callable"),
        ("make_int", "returned a int, not a torch.nn.Module"),
        ("broken", "ValueError: no weights here second line"),
    ],
)
def test_bad_factory_specs(factory_module: str, target: str, message: str) -> None:
    with pytest.raises(BnfixError, match=message):
        build_model(TinyNet().state_dict(), arch=f"{factory_module}:{target}")


def test_factory_module_that_does_not_exist() -> None:
    with pytest.raises(BnfixError, match="cannot import 'bnfix_no_such_module'"):
        build_model(TinyNet().state_dict(), arch="bnfix_no_such_module:make")


def test_factory_whose_one_module_is_named_like_a_wrapper_fits_its_own_state_dict(
    factory_module: str, tmp_path: Path
) -> None:
    """Every key of ``Wrapped().state_dict()`` starts ``encoder.``, which loading strips as a
    wrapper's prefix: the factory then did not fit its own weights (keys missing and
    unexpected), with no way to keep the prefix. The prefix goes back on when that fits."""
    module = importlib.import_module(factory_module)
    torch.manual_seed(0)
    original = module.Wrapped().eval()
    torch.save(original.state_dict(), tmp_path / "enc.pt")
    ckpt = load_checkpoint(tmp_path / "enc.pt")
    assert "stripped prefix 'encoder.'" in ckpt.unwrapped
    model, recognition = build_model(ckpt.state_dict, arch=f"{factory_module}:Wrapped")
    assert f"kept the prefix 'encoder.': {factory_module}:Wrapped names its own module so" in (
        recognition.notes
    )
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(x), original(x))
    out = tmp_path / "enc.keep.pt"
    done = run_inprocess("repair", tmp_path / "enc.pt", "--arch", f"{factory_module}:Wrapped",
                         "--modality", "visual", "--strategy", "keep", "--out", out)  # fmt: skip
    assert done.code == 0, done.stderr
    module.Wrapped().load_state_dict(torch.load(out))  # strict: the factory's own names


def test_factory_that_does_not_fit(factory_module: str, real: ModelFactory) -> None:
    with pytest.raises(BnfixError, match=r"does not fit this checkpoint: \d+ keys missing"):
        build_model(real("resnet18").state_dict(), arch=f"{factory_module}:make")


@pytest.mark.skipif(importlib.util.find_spec("timm") is not None, reason="timm is installed")
def test_timm_without_timm() -> None:
    with pytest.raises(BnfixError, match=r"timm is not installed: pip install timm"):
        build_model(TinyNet().state_dict(), arch="timm:resnet50")


# --------------------------------------------------------------------------------------------
# Helpers and invariants


def test_stem_in_channels() -> None:
    assert stem_in_channels(TinyNet(in_channels=5)) == 5
    with pytest.raises(BnfixError, match=r"no convolution \(Conv1d/2d/3d\)"):
        stem_in_channels(nn.Linear(2, 2))


def test_empty_weights_allocates_nothing_and_restores_torch() -> None:
    kaiming = nn.init.kaiming_uniform_
    with empty_weights():
        model = TinyNet()
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert nn.init.kaiming_uniform_ is kaiming
    assert not any(t.is_meta for t in TinyNet().parameters())


def test_each_family_representative_covers_its_members() -> None:
    """The prefilter relies on it: a member's checkpoint must be covered by its family."""
    for members in torchvision_zoo.families().values():
        first = members[0]
        covered = torchvision_zoo.torchvision_layout(first.name, first.kwargs).patterns
        for variant in members:
            layout = torchvision_zoo.torchvision_layout(variant.name, variant.kwargs)
            assert layout.patterns <= covered, variant.name


def test_stem_keys_are_every_members() -> None:
    """The search skips a family whose stem key a checkpoint lacks: it must be every member's."""
    for family, members in torchvision_zoo.families().items():
        for variant in members:
            layout = torchvision_zoo.torchvision_layout(variant.name, variant.kwargs)
            assert layout.stem_key == torchvision_zoo.STEM_KEYS[family], variant.name


def test_key_count_hints_are_current() -> None:
    """The hints only order the search; stale ones slow it down. Update ``FAMILIES``."""
    for members in torchvision_zoo.families().values():
        for variant in members:
            layout = torchvision_zoo.torchvision_layout(variant.name, variant.kwargs)
            assert len(layout.shapes) == variant.keys, variant
