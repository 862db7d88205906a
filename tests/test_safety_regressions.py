"""Regressions of the safety and correctness defects in checkpoint reading and the scan.

Each test failed on the code before its fix: a file's metadata that imported code, loose
tensors read as the model, partial wrapper prefixes, NaN statistics that gave a clean report,
legacy DenseNet layers left unprobed but counted as used, ``.pt`` outputs that did not load
with ``load_state_dict``, TorchScript files called corrupt, NaN tolerances, JSON with NaN.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from helpers import one_error_line, run_inprocess
from safetensors.torch import save_file

import bnfix
from bnfix.checkpoint import load_checkpoint, save_checkpoint
from bnfix.errors import BnfixError
from bnfix.masks import Thresholds, abnormal_mask, always_dead_mask, collapsed_mask
from bnfix.scan import scan_static
from bnfix.scan_run import ScanRequest, scan_one

EVIL = """
from pathlib import Path
Path({marker!r}).write_text("imported")

def build():
    Path({marker!r}).write_text("called")
    import torchvision
    return torchvision.models.resnet18()
"""


def strict_json(text: str) -> object:
    """Parse as a strict parser would: NaN and Infinity are errors."""

    def refuse(name: str) -> None:
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def resnet_state() -> dict[str, torch.Tensor]:
    """A ResNet-18 whose statistics look estimated (a fresh one would lint untrained_stats)."""
    torch.manual_seed(0)
    state = torchvision.models.resnet18().state_dict()
    for key, value in state.items():
        if key.endswith("running_mean"):
            value.normal_(0, 0.1)
        elif key.endswith("running_var"):
            value.uniform_(0.5, 2.0)
        elif key.endswith("num_batches_tracked"):
            value.fill_(100)
    return {k: v.contiguous() for k, v in state.items()}


@pytest.fixture
def evil_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, Path]:
    """A module on sys.path that leaves a marker file when imported or called."""
    marker = tmp_path / "marker.txt"
    name = f"evil_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(EVIL.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(tmp_path))
    return f"{name}:build", marker


def _tensor_probe(path: Path, n: int = 4, size: int = 32) -> Path:
    torch.manual_seed(1)
    torch.save(torch.randn(n, 3, size, size), path)
    return path


# --------------------------------------------------------------------- 1. metadata runs code


def test_a_factory_in_metadata_is_never_imported(resnet_state, evil_module, tmp_path) -> None:
    factory, marker = evil_module
    ckpt = tmp_path / "asks.safetensors"
    save_file(resnet_state, ckpt, metadata={"architecture": factory})

    static = run_inprocess("scan", ckpt)
    assert static.code == 0, static.stderr
    assert f"the metadata names the factory '{factory}'; not imported" in static.stdout
    assert "resnet18" in static.stdout  # recognised from the keys, as any checkpoint

    probe = _tensor_probe(tmp_path / "probe.pt")
    refused = run_inprocess("scan", ckpt, "--probe", probe)
    assert refused.code == 2
    line = one_error_line(refused.stderr)
    assert f"asks for the factory '{factory}'" in line and f"--arch {factory}" in line
    with pytest.raises(BnfixError, match="never imports code a file names"):
        bnfix.load(ckpt)
    plain = tmp_path / "plain.safetensors"
    save_file(resnet_state, plain)
    repaired = tmp_path / "repaired.safetensors"
    assert run_inprocess("repair", plain, "--modality", "visual", "--out", repaired).code == 0
    abri_state = load_checkpoint(repaired)
    save_file(
        abri_state.state_dict, repaired, metadata={**abri_state.metadata, "architecture": factory}
    )
    folded = run_inprocess("fold", repaired, "--out", tmp_path / "f.safetensors")
    assert folded.code == 2
    assert f"asks for the factory '{factory}'" in one_error_line(folded.stderr)
    assert not (tmp_path / "f.safetensors").exists()
    assert not marker.exists() and factory.split(":")[0] not in sys.modules

    # Named by the user, the same factory is used.
    model = bnfix.load(ckpt, arch=factory)
    assert marker.read_text() == "called"
    assert isinstance(model, torchvision.models.ResNet)


def test_built_in_names_in_metadata_stay_automatic(resnet_state, tmp_path) -> None:
    ckpt = tmp_path / "named.safetensors"
    save_file(resnet_state, ckpt, metadata={"architecture": "resnet18"})
    model = bnfix.load(ckpt)
    assert isinstance(model, torchvision.models.ResNet)


def test_timm_names_never_reach_a_hub(resnet_state) -> None:
    from bnfix.architectures import build_model, is_builtin

    assert not is_builtin("timm:hf-hub:someone/resnet18")
    with pytest.raises(BnfixError, match="no hub or local-dir"):
        build_model(resnet_state, "timm:hf-hub:someone/resnet18")


def test_arch_errors_name_the_option_they_came_from(resnet_state) -> None:
    from bnfix.architectures import build_model, create_model

    with pytest.raises(BnfixError, match=r"^model\.audio_arch: unknown architecture 'resnet19'"):
        create_model("resnet19", option="model.audio_arch")
    with pytest.raises(BnfixError, match=r"^model\.visual_arch resnet34 does not fit"):
        build_model(resnet_state, "resnet34", option="model.visual_arch")


# --------------------------------------------------------------------- 9. unwrapping


def test_nested_state_dict_beats_loose_scalar_tensors(resnet_state, tmp_path) -> None:
    path = tmp_path / "best.pth"
    torch.save({"state_dict": resnet_state, "best_acc1": torch.tensor(71.2)}, path)
    ckpt = load_checkpoint(path)
    assert set(ckpt.state_dict) == set(resnet_state)
    assert any("ignored loose tensors beside it: best_acc1" in n for n in ckpt.unwrapped)


def test_module_prefix_on_most_keys_is_stripped(resnet_state, tmp_path) -> None:
    mixed = {
        (k if i % 10 == 0 else f"module.{k}"): v for i, (k, v) in enumerate(resnet_state.items())
    }
    path = tmp_path / "mixed.pt"
    torch.save(mixed, path)
    ckpt = load_checkpoint(path)
    assert set(ckpt.state_dict) == set(resnet_state)
    carrying = sum(k.startswith("module.") for k in mixed)
    assert f"stripped prefix 'module.' (from {carrying} of {len(mixed)} keys)" in ckpt.unwrapped


def test_a_real_submodule_prefix_is_not_stripped_from_some_keys(resnet_state) -> None:
    from bnfix.checkpoint import unwrap

    # "backbone." on most keys is a sub-module's name, not a wrapper: keep the keys as they are.
    state = {f"backbone.{k}": v for k, v in resnet_state.items()}
    state["head.weight"] = torch.zeros(3, 3)
    got, notes = unwrap(state)
    assert set(got) == set(state) and not notes


# --------------------------------------------------------------------- 12. .pt outputs


def test_pt_outputs_load_with_load_state_dict(resnet_state, tmp_path) -> None:
    src = tmp_path / "src.safetensors"
    save_file(resnet_state, src)
    out = tmp_path / "repaired.pt"
    done = run_inprocess("repair", src, "--modality", "visual", "--out", out)
    assert done.code == 0, done.stderr
    state = torch.load(out, weights_only=True)
    model = bnfix.abri.convert(torchvision.models.resnet18())
    model.load_state_dict(state)  # strict: no extra keys
    assert load_checkpoint(out).metadata["strategy"] == "abri"

    plain = tmp_path / "plain.pt"
    save_checkpoint(resnet_state, plain, {"note": "x"})
    fresh = torchvision.models.resnet18()
    fresh.load_state_dict(torch.load(plain, weights_only=True))
    assert torch.equal(fresh.conv1.weight, resnet_state["conv1.weight"])
    assert load_checkpoint(plain).metadata == {"note": "x"}


def test_old_pt_layout_with_bnfix_metadata_still_reads(resnet_state, tmp_path) -> None:
    path = tmp_path / "old.pt"
    torch.save({"state_dict": resnet_state, "bnfix_metadata": {"strategy": "abri"}}, path)
    ckpt = load_checkpoint(path)
    assert ckpt.metadata == {"strategy": "abri"} and len(ckpt.state_dict) == len(resnet_state)


# --------------------------------------------------------------------- TorchScript


def test_torchscript_is_named_as_such(tmp_path) -> None:
    path = tmp_path / "scripted.pt"
    with pytest.warns(FutureWarning):
        torch.jit.save(torch.jit.script(torch.nn.BatchNorm2d(4)), path)
    done = run_inprocess("scan", path)
    assert done.code == 2
    assert "is a TorchScript archive (torch.jit.save), not a state dict" in one_error_line(
        done.stderr
    )


# --------------------------------------------------------------------- 3. NaN / Inf


def test_one_nan_gamma_keeps_the_relative_test_for_the_rest_of_the_layer() -> None:
    gamma = torch.ones(8, dtype=torch.float64)
    beta = torch.full((8,), 0.5, dtype=torch.float64)
    gamma[2], beta[2] = 1e-4, 1e-4  # 1e-4 of the median: abnormal by the relative test only
    gamma[5] = float("nan")
    beta[6] = float("inf")
    t = Thresholds()
    assert abnormal_mask(gamma, beta, t).nonzero().flatten().tolist() == [2]
    beta[3] = -1.0
    gamma[3] = 1e-7
    assert always_dead_mask(gamma, beta, t).nonzero().flatten().tolist() == [3]
    var = torch.tensor([1.0, -0.5, 0.0, float("nan")], dtype=torch.float64)
    assert collapsed_mask(var, t).nonzero().flatten().tolist() == [2]


def _broken(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    broken = {k: v.clone() for k, v in state.items()}
    broken["layer1.0.bn1.running_var"][3] = float("nan")
    broken["layer2.0.bn2.weight"][0] = float("nan")
    broken["layer3.1.bn1.bias"][9] = float("inf")
    broken["layer4.0.bn1.running_var"][1] = -0.25
    return broken


def test_nan_and_inf_statistics_are_never_a_clean_report(resnet_state, tmp_path) -> None:
    path = tmp_path / "broken.safetensors"
    save_file(_broken(resnet_state), path)
    report = scan_static(load_checkpoint(path))
    by_name = {layer.name: layer for layer in report.layers}
    assert by_name["layer1.0.bn1"].invalid == [3]
    assert by_name["layer2.0.bn2"].invalid == [0]
    assert by_name["layer3.1.bn1"].invalid == [9]
    assert by_name["layer4.0.bn1"].invalid == [1]
    assert by_name["layer4.0.bn1"].collapsed == []  # negative: invalid, not "collapsed"
    assert by_name["layer4.0.bn1"].lint == ["negative_var"]
    assert by_name["layer1.0.bn1"].lint == ["non_finite"]
    summary = report.summary
    assert summary.invalid == 4 and summary.unusable == 4
    assert summary.lint == {"non_finite": 3, "negative_var": 1}

    out = tmp_path / "broken.json"
    done = run_inprocess("scan", path, "--fail-on", "0", "--json", out)
    assert done.code == 1, done.stderr
    assert "4 channels in 4 layers hold NaN/Inf or a negative variance" in done.stdout
    doc = strict_json(out.read_text())
    assert doc["checkpoints"][0]["summary"]["lint"] == {"non_finite": 3, "negative_var": 1}


def test_a_probe_through_nan_judges_what_it_can(resnet_state, tmp_path) -> None:
    state = {k: v.clone() for k, v in resnet_state.items()}
    state["layer3.0.bn1.weight"][5] = float("nan")  # NaN reaches every layer after it
    path = tmp_path / "nan.safetensors"
    save_file(state, path)
    probe = _tensor_probe(tmp_path / "probe.pt")
    out = tmp_path / "nan.json"
    done = run_inprocess("scan", path, "--probe", probe, "--json", out)
    assert done.code == 0, done.stderr
    doc = strict_json(out.read_text())["checkpoints"][0]
    layers = {layer["name"]: layer for layer in doc["layers"]}
    assert layers["layer3.0.bn1"]["dead"] is not None  # its input is finite: judged
    assert layers["layer3.0.bn1"]["invalid"] == [5]
    # every later layer but the shortcut's BN, whose input comes from before the NaN
    after = [n for n in layers if n > "layer3.0.bn1" and n != "layer3.0.downsample.1"]
    assert layers["layer3.0.downsample.1"]["dead"] is not None
    assert after and all(layers[n]["unjudged"] == "non-finite outputs on the probe" for n in after)
    assert all(layers[n]["dead"] is None for n in after)
    judged = [layer for layer in doc["layers"] if layer["dead"] is not None]
    used = 1 - sum(
        len(set(x["dead"]) | set(x["always_dead"]) | set(x["invalid"])) for x in judged
    ) / sum(x["channels"] for x in judged)
    assert doc["summary"]["capacity_used"] == pytest.approx(used)
    assert doc["summary"]["unjudged_layers"] == len(after)
    assert f"{len(after)} BN layers could not be judged" in done.stdout


def test_json_never_holds_nan_or_infinity() -> None:
    from bnfix.jsonio import dumps

    text = dumps({"a": float("nan"), "b": [1.0, float("inf"), -float("inf")], "c": (2.5,)})
    assert strict_json(text) == {"a": None, "b": [1.0, None, None], "c": [2.5]}


# --------------------------------------------------------------------- 8. legacy DenseNet


def test_legacy_densenet_layers_are_all_probed(tmp_path) -> None:
    torch.manual_seed(0)
    state = torchvision.models.densenet121().state_dict()
    legacy = {
        re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v
        for k, v in state.items()
    }
    assert sum(k.endswith(".norm.1.weight") for k in legacy) == 58  # really the old layout
    path = tmp_path / "densenet_legacy.pth"
    torch.save(legacy, path)
    ckpt = load_checkpoint(path)
    probe = bnfix.probe.load_probe(_tensor_probe(tmp_path / "p.pt", n=3), None, 3)
    report = scan_one(ckpt, probe, ScanRequest([path]))
    assert report.architecture == "densenet121"
    assert len(report.layers) == 121
    assert all(layer.dead is not None for layer in report.layers)
    assert report.summary.unjudged_layers == 0
    assert any("legacy DenseNet key names" in n for n in report.notes)


def test_an_unreached_layer_is_not_counted_as_used(resnet_state, tmp_path) -> None:
    """A BN the forward never calls (here: one the model does not have) is left out."""
    from bnfix.scan import scan_probe

    state = dict(resnet_state)
    state["spare.weight"] = torch.ones(10)
    state["spare.bias"] = torch.full((10,), -1.0)
    state["spare.running_mean"] = torch.zeros(10)
    state["spare.running_var"] = torch.ones(10)
    path = tmp_path / "spare.safetensors"
    save_file(state, path)
    model = torchvision.models.resnet18()
    model.load_state_dict(resnet_state)
    report = scan_probe(load_checkpoint(path), model, [torch.randn(4, 3, 32, 32)], modality=None)
    spare = next(layer for layer in report.layers if layer.name == "spare")
    assert spare.dead is None and spare.unjudged == "not reached by the probe"
    judged = [layer for layer in report.layers if layer.dead is not None]
    expected = 1 - sum(len(x.unusable) for x in judged) / sum(x.channels for x in judged)
    assert report.summary.capacity_used == pytest.approx(expected)
    assert report.summary.unjudged_layers == 1


# --------------------------------------------------------------------- tolerance options


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--abs-tol", "-1e-5"),
        ("--rel-tol", "nan"),
        ("--var-tol", "inf"),
        ("--dead-fraction", "nan"),
        ("--fail-on", "nan"),
    ],
)
def test_tolerances_refuse_negative_and_nan(resnet_state, tmp_path, option, value) -> None:
    path = tmp_path / "r.safetensors"
    save_file(resnet_state, path)
    done = run_inprocess("scan", path, option, value)
    assert done.code == 2
    assert f"Invalid value for '{option}'" in one_error_line(done.stderr)


def test_thresholds_refuse_nan_from_python() -> None:
    with pytest.raises(BnfixError, match="rel_tol must be a finite number"):
        Thresholds(rel_tol=float("nan"))
