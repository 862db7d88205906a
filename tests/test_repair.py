"""bnfix repair / fold / load on real torchvision models with planted dead channels.

One repair and one fold run as a real subprocess, as a user runs them; the other CLI cases go
through the same entry point in-process.
"""

from __future__ import annotations

import json
import zlib

import pytest
import torch
import torchvision
from helpers import run_cli, run_inprocess
from rich.console import Console
from safetensors.torch import save_file
from test_scan import plant

import bnfix
from bnfix.abri import ABRiBatchNorm2d, abri_blocks
from bnfix.abri_keys import from_official
from bnfix.checkpoint import load_checkpoint, sha256_file
from bnfix.probe import AudioOptions, ImageOptions
from bnfix.repair_run import RepairRequest, run_fold, run_repair

QUIET = Console(quiet=True)


def planted_checkpoint(folder, arch="resnet18", in_channels=3):
    """A random-init model with planted bad channels, saved as a .pt; returns (path, expected)."""
    torch.manual_seed(7)
    model = torchvision.models.get_model(arch, num_classes=10)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    expected = plant(state, seed=zlib.crc32(arch.encode()))
    path = folder / f"{arch}.pt"
    torch.save(state, path)
    return path, expected


@pytest.fixture(scope="module")
def resnet18_ckpt(tmp_path_factory):
    """The planted ResNet-18, built once for the module: no test writes to it (they check)."""
    return planted_checkpoint(tmp_path_factory.mktemp("planted"))


def audio_probe(folder, n=16, size=64, channels=1, seed=3):
    path = folder / f"probe{channels}.pt"
    torch.save(
        torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(seed)), path
    )
    return path


def request(ckpt, **kw) -> RepairRequest:
    kw.setdefault("modality", "audio")
    return RepairRequest(checkpoint=ckpt, audio=AudioOptions(), image=ImageOptions(), **kw)


def dead_set(scan) -> set[tuple[str, int]]:
    return {(layer.name, c) for layer in scan.layers for c in layer.dead or ()}


def test_repair_cli_revives_the_planted_channels(tmp_path, resnet18_ckpt):
    ckpt, expected = resnet18_ckpt
    probe = audio_probe(tmp_path)
    digest = sha256_file(ckpt)
    out = tmp_path / "repaired.safetensors"
    report = tmp_path / "scan.json"
    run = run_cli(
        "repair", ckpt, "--modality", "audio", "--probe", probe, "--out", out, "--json", report
    )
    assert run.code == 0, run.stderr
    assert "[1] before" in run.stdout and "[2] after" in run.stdout and f"wrote {out}" in run.stdout
    assert sha256_file(ckpt) == digest  # the input is never modified
    scans = json.loads(report.read_text())["checkpoints"]
    before = {(layer["name"], c) for layer in scans[0]["layers"] for c in layer["dead"]}
    after = {(layer["name"], c) for layer in scans[1]["layers"] for c in layer["dead"]}
    assert expected["dead"] <= before
    assert len(after) <= len(before) and not (after & expected["dead"])
    assert [layer["name"] for layer in scans[0]["layers"]] == [
        layer["name"] for layer in scans[1]["layers"]
    ]
    meta = load_checkpoint(out).metadata
    assert meta["strategy"] == "abri" and meta["alpha"] == "0.5" and meta["alpha_per"] == "layer"
    assert meta["source_sha256"] == digest and meta["architecture"] == "resnet18"
    assert meta["modality"] == "audio" and meta["in_channels"] == "1"
    assert meta["stem"].startswith("conv1: 3 -> 1") and meta["recalibrated"] == "no"


@pytest.mark.parametrize(
    ("strategy", "per", "recal"),
    [
        ("abri", "layer", False),
        ("abri", "channel", True),
        ("reset-dead", "layer", False),
        ("reset-all", "layer", True),
    ],
)
def test_load_gives_the_outputs_of_the_saved_model(tmp_path, resnet18_ckpt, strategy, per, recal):
    ckpt, expected = resnet18_ckpt
    probe = audio_probe(tmp_path)
    out = tmp_path / f"{strategy}.safetensors"
    result = run_repair(
        request(
            ckpt, strategy=strategy, per=per, probe=probe, recalibrate=recal, out=out, alpha=0.3
        ),
        QUIET,
    )
    x = torch.randn(3, 1, 64, 64)
    loaded = bnfix.load(out)
    with torch.no_grad():
        assert torch.equal(loaded(x), result.model(x))
    assert bool(abri_blocks(loaded)) == (strategy == "abri")
    assert not (dead_set(result.after) & expected["dead"])
    if strategy == "abri":
        alphas = {tuple(b.alpha.shape) for b in abri_blocks(loaded).values()}
        assert alphas == {(1,) if per == "layer" else (64,), (128,), (256,), (512,)} - (
            set() if per == "channel" else {(128,), (256,), (512,)}
        )
        assert all(torch.allclose(b.alpha, torch.tensor(0.3)) for b in abri_blocks(loaded).values())
    if strategy == "reset-dead":
        assert result.outcome.channels == len(expected["abnormal"] | expected["always_dead"])
        sd = loaded.state_dict()
        for name, channel in expected["always_dead"]:
            assert sd[f"{name}.weight"][channel] == 1 and sd[f"{name}.bias"][channel] == 0


def test_recalibration_sets_statistics_to_the_probes(tmp_path, resnet18_ckpt):
    """With equal batches, the cumulative mean is the probe's mean of each BN's input."""
    ckpt, _ = resnet18_ckpt
    probe = audio_probe(tmp_path, n=16)
    result = run_repair(  # str paths, as a Python caller may pass them
        request(
            str(ckpt),
            probe=str(probe),
            recalibrate=True,
            batch_size=8,
            out=str(tmp_path / "r.safetensors"),
        ),
        QUIET,
    )
    model = result.model
    x = torch.load(probe)
    with torch.no_grad():
        stem_out = model.conv1(x)
    block = model.bn1
    assert isinstance(block, ABRiBatchNorm2d)
    torch.testing.assert_close(
        block.original.running_mean, stem_out.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5
    )
    # both BNs saw the same batches: equal statistics, so the fold is exact in training mode too
    assert torch.equal(block.original.running_mean, block.additional.running_mean)
    assert torch.equal(block.original.running_var, block.additional.running_var)
    assert result.metadata["recalibrated"] == "yes (2 probe batches)"


def test_fold_cli_then_stock_architecture_loads_it(tmp_path):
    ckpt, _ = planted_checkpoint(tmp_path, arch="mobilenet_v2")
    repaired = tmp_path / "mnv2.abri.safetensors"
    run = run_inprocess(
        "repair", ckpt, "--modality", "audio", "--out", repaired, "--alpha-per", "channel"
    )
    assert run.code == 0, run.stderr
    folded = tmp_path / "mnv2.folded.pt"
    run = run_cli("fold", repaired, "--out", folded)  # fold as a user runs it
    assert run.code == 0, run.stderr
    deviation = float(run.stdout.split("max eval-mode deviation on random inputs ")[1].split()[0])
    assert deviation <= 1e-5
    stock = torchvision.models.mobilenet_v2(num_classes=10)
    stock.features[0][0] = torch.nn.Conv2d(1, 32, 3, 2, 1, bias=False)
    stock.load_state_dict(load_checkpoint(folded).state_dict, strict=True)
    abri = bnfix.load(repaired)
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        want, got = abri(x), stock.eval()(x)
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-5
    assert load_checkpoint(folded).metadata["bnfix_command"] == "fold"
    assert torch.equal(bnfix.load(folded)(x), got)


def test_scan_of_a_repaired_checkpoint_lines_up_layer_by_layer(tmp_path, resnet18_ckpt):
    ckpt, expected = resnet18_ckpt
    repaired = tmp_path / "r.safetensors"
    run_repair(request(ckpt, modality="visual", out=repaired), QUIET)
    probe = audio_probe(tmp_path, channels=3)
    run = run_inprocess(
        "scan", ckpt, repaired, "--modality", "visual", "--probe", probe, "--json", "-"
    )
    assert run.code == 0, run.stderr
    scans = json.loads(run.stdout)["checkpoints"]
    names = [[layer["name"] for layer in s["layers"]] for s in scans]
    assert names[0] == names[1] and len(names[0]) == 20  # ResNet-18: 20 BNs, 20 ABRi blocks
    abnormal_after = sum(len(layer["abnormal"]) for layer in scans[1]["layers"])
    assert abnormal_after == 0 < len(expected["abnormal"])
    dead = [{(la["name"], c) for la in s["layers"] for c in la["dead"]} for s in scans]
    assert expected["dead"] <= dead[0] and not (dead[1] & expected["dead"])
    assert scans[1]["architecture"] == "resnet18" and scans[1]["probe_samples"] == 16


def official_layout(state: dict[str, torch.Tensor], per_channel: bool) -> dict[str, torch.Tensor]:
    """Rename a bnfix ABRi ResNet state into the paper's released layout (written out by hand)."""
    out = {}
    for key, value in state.items():
        k = key.replace(".downsample.0.", ".downsample.conv.").replace(
            ".downsample.1.", ".downsample.bn."
        )
        parts = k.split(".")
        if "original" in parts or "additional" in parts:
            i = parts.index("original") if "original" in parts else parts.index("additional")
            bn = parts[i - 1] + ("_addition" if parts[i] == "additional" else "")
            k = ".".join([*parts[: i - 1], bn, *parts[i + 1 :]])
        elif parts[-1] == "alpha":
            owner = parts[-2]
            suffix = "" if owner in ("bn",) or parts[:-2] == [] else owner.removeprefix("bn")
            k = ".".join([*parts[:-2], f"fusion_weight{suffix}"])
            value = value.reshape(1, -1, 1, 1) if per_channel else value
        if not k.startswith("fc."):
            out[k] = value
    return out


@pytest.mark.parametrize("per_channel", [False, True])
def test_official_abri_checkpoint_is_read_and_folded(tmp_path, per_channel):
    torch.manual_seed(4)
    model = bnfix.abri.convert(
        torchvision.models.resnet18(), per="channel" if per_channel else "layer"
    )
    with torch.no_grad():
        for block in abri_blocks(model).values():
            block.alpha.uniform_(0.2, 0.8)
            block.additional.running_var.uniform_(0.5, 2)
    official = official_layout(model.state_dict(), per_channel)
    assert (
        "layer1.0.bn1_addition.weight" in official and "layer2.0.downsample.conv.weight" in official
    )
    assert "fusion_weight" in official and "layer2.0.downsample.fusion_weight" in official
    _, found = from_official(official)
    assert found
    path = tmp_path / "official.pth"
    torch.save(official, path)
    out = tmp_path / "folded.safetensors"
    result = run_fold(path, out)
    assert result.blocks == 20 and result.max_deviation <= 1e-5
    loaded = bnfix.load(path)
    assert torch.equal(loaded.layer2[0].downsample[1].alpha, model.layer2[0].downsample[1].alpha)
    x = torch.randn(2, 3, 64, 64)
    model.fc = torch.nn.Identity()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x))
        torch.testing.assert_close(bnfix.load(out)(x), model(x), rtol=1e-5, atol=1e-5)


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, resnet18_ckpt):
    ckpt, _ = resnet18_ckpt
    rgb_probe = audio_probe(tmp_path, channels=3)
    out = tmp_path / "never.safetensors"
    repaired = tmp_path / "r.safetensors"
    run_repair(request(ckpt, out=repaired), QUIET)
    cases = [
        (("fold", ckpt, "--out", out), "not an ABRi-repaired checkpoint"),
        (("repair", ckpt, "--modality", "audio", "--strategy", "magic", "--out", out), "magic"),
        (("repair", ckpt, "--modality", "audio", "--alpha", "1.5", "--out", out), "1.5"),
        (("repair", ckpt, "--modality", "audio", "--probe", rgb_probe, "--out", out), "3 channels"),
        (("repair", ckpt, "--modality", "audio", "--out", ckpt), "overwrite an input"),
        (("repair", ckpt, "--modality", "audio", "--recalibrate", "--out", out), "--probe"),
        (("repair", repaired, "--modality", "audio", "--out", out), "already holds ABRi"),
        (("repair", ckpt, "--modality", "audio", "--out", repaired), "pass --force"),
        (("fold", repaired, "--out", repaired), "overwrite an input"),
        (("repair", tmp_path / "missing.pt", "--modality", "audio", "--out", out), "no such file"),
        (
            ("repair", ckpt, "--modality", "audio", "--out", "/proc/bnfix.safetensors"),
            "cannot write",
        ),
    ]
    digest = sha256_file(repaired)
    for args, message in cases:  # in-process: test_cli runs a refusal as a real process
        run = run_inprocess(*args)
        assert run.code == 2, (args, run.stderr)
        assert message in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
        assert "Traceback" not in run.stderr
        assert not out.exists()
    assert sha256_file(repaired) == digest


def test_safetensors_source_and_select(tmp_path, resnet18_ckpt):
    """An audio-visual file: repair one sub-model chosen with --select."""
    ckpt, _ = resnet18_ckpt
    state = torch.load(ckpt)
    av = {f"audio_net.{k}": v for k, v in state.items()} | {
        f"visual_net.{k}": v.clone() for k, v in state.items()
    }
    path = tmp_path / "av.safetensors"
    save_file(av, path)
    out = tmp_path / "audio.safetensors"
    run = run_inprocess(
        "repair", path, "--select", "audio_net.", "--modality", "audio", "--out", out
    )
    assert run.code == 0, run.stderr
    assert len(abri_blocks(bnfix.load(out))) == 20


@pytest.mark.parametrize(("have", "want"), [(3, 1), (1, 3)])
def test_stem_adaptation_is_the_same_arithmetic_as_adapting_the_input(have, want):
    from bnfix.stem import adapt_stem

    torch.manual_seed(5)
    conv = torch.nn.Conv2d(have, 8, 3)
    model = torch.nn.Sequential(conv)
    original = torch.nn.Conv2d(have, 8, 3)
    original.load_state_dict(conv.state_dict())
    note = adapt_stem(model, want)
    assert note.startswith(f"0: {have} -> {want}") and model[0].in_channels == want
    x = torch.randn(2, want, 9, 9, dtype=torch.float64)
    # 3 -> 1: a spectrogram repeated to RGB; 1 -> 3: an image averaged to one channel
    same = x.expand(-1, 3, -1, -1) if want == 1 else x.mean(dim=1, keepdim=True)
    torch.testing.assert_close(model.double()(x), original.double()(same))
    assert adapt_stem(model, want) is None


def test_reset_dead_also_resets_invalid_channels_and_their_statistics() -> None:
    """A NaN γ, an Inf β and a negative running variance are unusable channels (the scan
    counts them invalid): reset-dead makes them a plain γ=1, β=0 channel on mean 0, variance 1,
    and leaves healthy channels alone."""
    from bnfix.repair import reset_dead

    bn = torch.nn.BatchNorm2d(6)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.9, float("nan"), 1.1, 0.8, 1.2, 1.0]))
        bn.bias.copy_(torch.tensor([0.1, 0.0, float("inf"), -0.1, 0.2, 0.0]))
        bn.running_mean.copy_(torch.tensor([0.5, float("nan"), 0.3, 0.2, 0.1, 0.0]))
        bn.running_var.copy_(torch.tensor([1.5, 2.0, 1.0, -1.0, 0.7, 1.0]))
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 1), bn)
    outcome = reset_dead(model)
    assert outcome.reset == {"1": [1, 2, 3]}
    assert bn.weight.tolist()[1:4] == [1.0, 1.0, 1.0] and bn.bias.tolist()[1:4] == [0.0] * 3
    assert bn.running_mean.tolist()[1:4] == [0.0] * 3 and bn.running_var.tolist()[1:4] == [1.0] * 3
    assert bn.weight[0].item() == pytest.approx(0.9) and bn.running_var[4].item() == pytest.approx(
        0.7
    )
    model.eval()
    assert torch.isfinite(model(torch.randn(2, 3, 4, 4))).all()


def test_reset_dead_leaves_zero_initialised_layers_as_the_scan_reports_them() -> None:
    """A zero_init_residual ResNet's bn2 layers hold γ = β = 0 by design: the scan flags none
    of their channels (lint zero_layer), yet reset-dead set γ = 1 on all 1,920 of them,
    turning every residual branch on."""
    from bnfix.masks import Thresholds
    from bnfix.repair import flagged_channels, reset_dead

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10, zero_init_residual=True).eval()
    with torch.no_grad():
        model.layer2[0].bn1.weight[:3] = 0.0  # three channels that did die
        model.layer2[0].bn1.bias[:3] = -1.0
    zero = [n for n, m in model.named_modules() if n.endswith("bn2")]
    assert len(zero) == 8
    before = {k: v.clone() for k, v in model.state_dict().items()}

    outcome = reset_dead(model)

    assert outcome.reset == {"layer2.0.bn1": [0, 1, 2]}
    for name in zero:
        assert flagged_channels(model.get_submodule(name), Thresholds()) == []
        assert torch.equal(model.state_dict()[f"{name}.weight"], before[f"{name}.weight"])


def test_pt_outputs_keep_the_module_versions_torchvision_needs(tmp_path) -> None:
    """The README's ``model.load_state_dict(torch.load(path))`` on a repaired or folded .pt:
    MNASNet raised 'version should be set to 1 or 2 instead of None' because the state dict
    was rebuilt as a plain dict, without the module versions in its ``_metadata``."""
    torch.manual_seed(0)
    torch.save(torchvision.models.mnasnet0_5(num_classes=10).state_dict(), tmp_path / "m.pt")
    repaired = tmp_path / "m.reset.pt"
    done = run_inprocess("repair", tmp_path / "m.pt", "--modality", "visual",
                         "--strategy", "reset-dead", "--out", repaired)  # fmt: skip
    assert done.code == 0, done.stderr
    abri, folded = tmp_path / "m.abri.safetensors", tmp_path / "m.folded.pt"
    assert (
        run_inprocess("repair", tmp_path / "m.pt", "--modality", "visual", "--out", abri).code == 0
    )
    done = run_inprocess("fold", abri, "--out", folded)
    assert done.code == 0, done.stderr
    for path in (repaired, folded):
        model = torchvision.models.mnasnet0_5(num_classes=10)
        model.load_state_dict(torch.load(path))  # strict, as the README says
        assert torch.load(path)._metadata[""]["version"] == 2
