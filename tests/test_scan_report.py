"""A scan report users can act on: lint on real weights, honest probe sampling, the
recommendation (none / recalibrate / repair) and the plot."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision
from helpers import one_error_line, run_inprocess
from PIL import Image
from safetensors.torch import save_file

from bnfix.checkpoint import load_checkpoint
from bnfix.probe import load_probe, sampling_order
from bnfix.recommend import recommend
from bnfix.scan import scan_probe, scan_static


@pytest.fixture(scope="module")
def mobilenet_state(mobilenet_v2_path: Path) -> dict[str, torch.Tensor]:
    return torch.load(mobilenet_v2_path, weights_only=True)


def _lint(report) -> dict[str, list[str]]:
    return {layer.name: layer.lint for layer in report.layers if layer.lint}


# --------------------------------------------------------------------- lint


def test_real_imagenet_weights_have_no_lint(mobilenet_v2_path: Path) -> None:
    report = scan_static(load_checkpoint(mobilenet_v2_path))
    assert _lint(report) == {} and report.summary.lint == {}


def test_each_planted_problem_is_reported_exactly(
    mobilenet_v2_path, mobilenet_state, tmp_path
) -> None:
    state = {k: v.clone() for k, v in mobilenet_state.items()}
    state["features.2.conv.0.1.running_mean"][4] = float("nan")
    state["features.5.conv.1.1.running_var"][7] = -0.5
    state["features.7.conv.3.running_mean"].zero_()  # statistics never estimated
    state["features.7.conv.3.running_var"].fill_(1.0)
    state["features.7.conv.3.num_batches_tracked"].zero_()
    state["features.9.conv.3.weight"].zero_()  # a zero-initialised residual branch
    state["features.9.conv.3.bias"].zero_()
    path = tmp_path / "planted.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    report = scan_static(load_checkpoint(path))
    assert _lint(report) == {
        "features.2.conv.0.1": ["non_finite"],
        "features.5.conv.1.1": ["negative_var"],
        "features.7.conv.3": ["untrained_stats"],
        "features.9.conv.3": ["zero_layer"],
    }
    assert report.summary.lint == {
        "non_finite": 1,
        "negative_var": 1,
        "untrained_stats": 1,
        "zero_layer": 1,
    }
    layers = {layer.name: layer for layer in report.layers}
    zero = layers["features.9.conv.3"]
    assert zero.abnormal == [] and zero.always_dead == [] and zero.unusable == set()
    assert layers["features.5.conv.1.1"].collapsed == []
    assert layers["features.2.conv.0.1"].invalid == [4]
    assert layers["features.5.conv.1.1"].invalid == [7]
    # nothing else moved: the other counts are those of the real weights
    real = scan_static(load_checkpoint(mobilenet_v2_path)).summary
    assert (report.summary.abnormal, report.summary.always_dead) == (
        real.abnormal,
        real.always_dead,
    )

    done = run_inprocess("scan", path, "--json", tmp_path / "lint.json")
    assert done.code == 0, done.stderr
    text = " ".join(done.stdout.split())  # the verdict may wrap at the console's width
    assert "lint (layers): 1 stats never estimated, 1 γ=β=0 (zero-init branch?)" in text
    doc = json.loads((tmp_path / "lint.json").read_text())["checkpoints"][0]
    assert doc["summary"]["lint"] == report.summary.lint
    assert {x["name"]: x["lint"] for x in doc["layers"] if x["lint"]} == _lint(report)


def test_fresh_timm_resnet50d_is_not_full_of_dead_channels(tmp_path) -> None:
    torch.manual_seed(0)
    model = timm.create_model("resnet50d", pretrained=False)  # zero-init last BN per block
    path = tmp_path / "resnet50d.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    summary = scan_static(load_checkpoint(path)).summary
    assert summary.always_dead == 0 and summary.abnormal == 0
    assert summary.lint == {"untrained_stats": 55, "zero_layer": 16}


def test_keras_momentum_is_seen_when_a_model_is_built(tmp_path) -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    model.layer2[0].bn1.momentum = 0.99
    path = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    model.eval()
    report = scan_probe(load_checkpoint(path), model, [torch.randn(4, 3, 32, 32)], modality=None)
    assert {n: codes for n, codes in _lint(report).items() if "keras_momentum" in codes} == {
        "layer2.0.bn1": ["untrained_stats", "keras_momentum"]
    }


# --------------------------------------------------------------------- probe sampling


@pytest.fixture(scope="module")
def sorted_probe(tmp_path_factory) -> Path:
    """137 small images in 7 class folders of unequal size, as a dataset lays them out."""
    root = tmp_path_factory.mktemp("probe137")
    rng = np.random.default_rng(0)
    for c, n in enumerate([30, 25, 20, 20, 17, 15, 10]):
        folder = root / f"class{c}"
        folder.mkdir()
        for i in range(n):
            pixels = rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return root


def _classes(sources: list[str]) -> collections.Counter:
    return collections.Counter(Path(s).parent.name for s in sources)


def test_a_probe_limit_draws_from_every_class(sorted_probe: Path) -> None:
    from bnfix.probe import ImageOptions

    opts = ImageOptions(size=8, resize=8)
    first = load_probe(sorted_probe, "visual", 32, image=opts, seed=0)
    again = load_probe(sorted_probe, "visual", 32, image=opts, seed=0)
    other = load_probe(sorted_probe, "visual", 32, image=opts, seed=1)
    assert first.files == 137 and len(first.sources) == 32
    assert set(_classes(first.sources)) == {f"class{c}" for c in range(7)}
    assert first.sources == again.sources and torch.equal(first.tensor, again.tensor)
    assert first.sources != other.sources
    assert set(_classes(other.sources)) == {f"class{c}" for c in range(7)}
    # the largest class is not over-drawn: about 32·30/137 ≈ 7 of its files
    assert 6 <= _classes(first.sources)["class0"] <= 8


def test_sampling_is_uniform_over_files(sorted_probe: Path) -> None:
    files = sorted(p for p in sorted_probe.rglob("*.png"))
    picks = collections.Counter()
    for seed in range(400):
        picks.update(sampling_order(files, sorted_probe, seed)[:32])
    counts = np.array([picks[f] for f in files])
    expected = 400 * 32 / 137
    assert abs(counts.mean() - expected) < 1e-9
    assert counts.min() > 0.6 * expected and counts.max() < 1.4 * expected


def test_the_report_says_which_files_were_used(sorted_probe: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = tmp_path / "r18.safetensors"
    save_file(
        {k: v.contiguous() for k, v in torchvision.models.resnet18().state_dict().items()}, path
    )
    out = tmp_path / "scan.json"
    done = run_inprocess(
        "scan", path, "--probe", sorted_probe, "--probe-limit", "32", "--seed", "3",
        "--image-size", "16", "--json", out,
    )  # fmt: skip
    assert done.code == 0, done.stderr
    assert "32 visual samples (32 of 137 files)" in done.stdout
    doc = json.loads(out.read_text())["checkpoints"][0]
    assert doc["probe_samples"] == 32 and doc["probe_files"] == 137
    assert len(doc["probe_sources"]) == 32 and len(set(_classes(doc["probe_sources"]))) == 7


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--seed", "one"), "Invalid value for '--seed'"),
        (("--probe-limit", "0"), "Invalid value for '--probe-limit'"),
    ],
)
def test_bad_sampling_options_are_one_line(sorted_probe, tmp_path, args, needle) -> None:
    path = tmp_path / "x.safetensors"
    bn = {"weight": torch.ones(2), "bias": torch.zeros(2), "running_mean": torch.zeros(2)}
    save_file({f"bn.{k}": v for k, v in {**bn, "running_var": torch.ones(2)}.items()}, path)
    for command in (("scan", path), ("repair", path, "--modality", "visual")):
        done = run_inprocess(*command, "--probe", sorted_probe, *args)
        assert done.code == 2 and needle in one_error_line(done.stderr)


# --------------------------------------------------------------------- recommendation


def _collapse(state: dict[str, torch.Tensor], layers: list[str], share: float = 0.8) -> dict:
    g = torch.Generator().manual_seed(0)
    state = {k: v.clone() for k, v in state.items()}
    for name in layers:
        n = state[f"{name}.weight"].numel()
        idx = torch.randperm(n, generator=g)[: int(share * n)]
        state[f"{name}.weight"][idx] = 1e-12
        state[f"{name}.bias"][idx] = -1e-3
    return state


@pytest.fixture(scope="module")
def demo_audio(tmp_path_factory) -> Path:
    from bnfix.probe import write_demo_audio

    folder = tmp_path_factory.mktemp("demo-audio")
    write_demo_audio(folder, n=8)  # half the demo's clips: the same verdicts, half the cost
    return folder


def test_recalibrate_for_a_domain_gap_repair_for_mass_collapse(
    mobilenet_v2_path, mobilenet_state, demo_audio, tmp_path
) -> None:
    collapsed = tmp_path / "collapsed.pth"
    early = ["features.1.conv.0.1", "features.2.conv.0.1", "features.2.conv.1.1"]
    torch.save(_collapse(mobilenet_state, early), collapsed)
    out = tmp_path / "both.json"
    done = run_inprocess(
        "scan", mobilenet_v2_path, collapsed, "--modality", "audio", "--probe", demo_audio,
        "--frames", "128", "--json", out,
    )  # fmt: skip
    assert done.code == 0, done.stderr
    healthy, broken = json.loads(out.read_text())["checkpoints"]
    rec = healthy["recommendation"]
    assert rec["action"] == "recalibrate", rec
    assert rec["capacity_lost"] < 0.02 and rec["stem_gap"]["name"] == "features.0.1"
    assert abs(rec["stem_gap"]["log_var_ratio"]) >= 1.0
    assert "--strategy keep" in rec["command"] and "--recalibrate" in rec["command"]
    rec = broken["recommendation"]
    assert rec["action"] == "repair", rec
    assert rec["worst_layer"]["dead_share"] >= 0.5 and rec["worst_layer"]["depth"] < 0.5
    assert all(name in rec["reasons"][0] for name in early)
    assert "recommendation: recalibrate" in done.stdout and "recommendation: repair" in done.stdout


def test_static_recommendation_follows_abnormal_pairs(mobilenet_state, tmp_path) -> None:
    state = {k: v.clone() for k, v in mobilenet_state.items()}
    healthy = recommend(scan_static(_ckpt(state, tmp_path / "a.safetensors")))
    assert healthy.action == "none" and healthy.capacity_lost is None
    for name in ["features.3.conv.0.1", "features.4.conv.0.1"]:
        state[f"{name}.weight"][:100] = 1e-12
        state[f"{name}.bias"][:100] = 1e-12
    heavy = recommend(scan_static(_ckpt(state, tmp_path / "b.safetensors")))
    assert heavy.action == "repair" and "2 layers hold ≥25% abnormal" in heavy.reasons[0]


def _ckpt(state: dict[str, torch.Tensor], path: Path):
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    return load_checkpoint(path)


# --------------------------------------------------------------------- plot


def test_plot_names_layers_and_draws_the_domain_gap(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bnfix import report

    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    path = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    scans = [
        scan_probe(load_checkpoint(path), model, [torch.randn(4, 3, 32, 32)], modality=None),
        scan_static(load_checkpoint(path)),
    ]
    captured = {}
    original = plt.Figure.savefig

    def keep(fig, *args, **kwargs):
        captured["fig"] = fig
        return original(fig, *args, **kwargs)

    monkeypatch.setattr(plt.Figure, "savefig", keep)  # the plot closes its figure
    report.plot(scans, tmp_path / "p.png")
    fig = captured["fig"]
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    top, gap = fig.axes
    names = [t.get_text() for t in gap.get_xticklabels()]
    assert names == [layer.name for layer in scans[0].layers]
    assert gap.get_ylabel() == "domain gap"
    assert len(top.containers) == 2  # one bar group per checkpoint
    heights = [bar.get_height() for bar in gap.containers[0]]
    assert heights == pytest.approx([layer.mean_shift for layer in scans[0].layers])


# --------------------------------------------------------------------- unusual paths


def _small_images(folder: Path, n: int = 4) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(n):
        pixels = rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
    return folder


def test_a_fifo_in_the_probe_folder_is_skipped_not_waited_on(tmp_path: Path) -> None:
    import os

    from helpers import run_cli

    path = tmp_path / "r18.safetensors"
    torch.manual_seed(0)
    save_file(
        {k: v.contiguous() for k, v in torchvision.models.resnet18().state_dict().items()}, path
    )
    probe = _small_images(tmp_path / "pf", n=2)
    os.mkfifo(probe / "f.png")
    # a subprocess with a timeout: without the fix the scan opens the FIFO and waits forever
    done = run_cli(
        "scan", path, "--probe", probe, "--modality", "visual", "--image-size", "16", timeout=180
    )
    assert done.code == 0, done.stderr
    assert f"skipped {probe / 'f.png'}: not a regular file (a FIFO)" in done.stdout
    assert "2 visual samples" in done.stdout
    for fifo in (probe / "f.png", "/dev/zero"):
        done = run_cli("scan", path, "--probe", fifo, "--modality", "visual", timeout=180)
        assert done.code == 2
        assert "cannot read this probe: not a regular file" in one_error_line(done.stderr)


def test_the_next_command_quotes_paths_so_it_pastes(tmp_path: Path, monkeypatch) -> None:
    import shlex

    monkeypatch.chdir(tmp_path)
    ckpt = Path("ünï 日本") / "sub dir [v2]" / "模型 é.pth"  # [v2]: rich markup, printed as is
    ckpt.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), ckpt)  # stats never estimated
    probe = _small_images(Path("probe 'it's' $HOME"))
    done = run_inprocess(
        "scan", ckpt, "--probe", probe, "--modality", "visual", "--image-size", "16",
        "--json", "scan.json",
    )  # fmt: skip
    assert done.code == 0, done.stderr
    rec = json.loads(Path("scan.json").read_text())["checkpoints"][0]["recommendation"]
    assert rec["action"] in ("recalibrate", "repair"), rec
    argv = shlex.split(rec["command"])
    assert argv[:3] == ["bnfix", "repair", str(ckpt)]
    assert argv[argv.index("--probe") + 1] == str(probe)
    assert argv[argv.index("--modality") + 1] == "visual"
    assert f"next: {rec['command']}" in done.stdout
    # plain paths are left as they were
    plain = Path("plain") / "m.pth"
    plain.parent.mkdir()
    torch.save(torchvision.models.resnet18().state_dict(), plain)
    done = run_inprocess("scan", plain, "--modality", "visual", "--json", "plain.json")
    assert done.code == 0, done.stderr
    rec = json.loads(Path("plain.json").read_text())["checkpoints"][0]["recommendation"]
    assert rec["command"].startswith("bnfix repair plain/m.pth --modality visual"), rec


def test_the_next_command_repeats_the_options_that_chose_the_model_and_features(
    tmp_path: Path,
) -> None:
    """A scan of one sub-model (--select) on its own feature settings recommended a repair
    without them: pasted, it could not recognise the two-model file, and it would have
    recalibrated on other features than the ones the scan judged."""
    import shlex

    torch.manual_seed(0)
    state = torchvision.models.resnet18().state_dict()  # statistics never estimated
    both = {f"audio_net.{k}": v for k, v in state.items()}
    both |= {f"visual_net.{k}": v for k, v in state.items()}
    ckpt = tmp_path / "av.pt"
    torch.save(both, ckpt)
    probe = _small_images(tmp_path / "imgs")
    out = tmp_path / "scan.json"
    done = run_inprocess(
        "scan", ckpt, "--select", "visual_net.", "--probe", probe, "--modality", "visual",
        "--image-size", "16", "--probe-limit", "2", "--json", out,
    )  # fmt: skip
    assert done.code == 0, done.stderr
    command = json.loads(out.read_text())["checkpoints"][0]["recommendation"]["command"]
    argv = shlex.split(command)
    for option, value in (("--select", "visual_net."), ("--image-size", "16"),
                          ("--probe-limit", "2"), ("--probe", str(probe))):  # fmt: skip
        assert argv[argv.index(option) + 1] == value, command
    assert "--mel-bins" not in argv  # defaults are not repeated
    repaired = tmp_path / "r.safetensors"
    done = run_inprocess(*argv[1:], "--out", repaired)  # the command as given works
    assert done.code == 0, done.stderr
    assert repaired.exists()
