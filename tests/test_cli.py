"""``bnfix scan`` on real checkpoints, real audio, real refusals.

One run per kind (a probe scan, a refusal, the demo) is a real subprocess, as a user runs it;
the other cases go through the same ``main`` in-process (a subprocess costs a torch import,
~5 s of CPU, per case).
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchvision
from helpers import one_error_line, run_cli, run_inprocess
from safetensors.torch import save_file
from torch import nn

from bnfix.checkpoint import load_checkpoint
from bnfix.demo import STAGE2_EPOCHS_ENV


@pytest.fixture(scope="module")
def audio_resnet(tmp_path_factory) -> tuple[Path, dict[str, set[int]]]:
    """The layout of the paper's audio ResNet-18 (1-channel stem, no fc) with planted channels."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    model.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}
    state["layer1.1.bn2.weight"][7] = 0.0
    state["layer1.1.bn2.bias"][7] = -0.8
    state["layer3.0.bn1.weight"][40] = 1e-9
    state["layer3.0.bn1.bias"][40] = -3e-6
    state["layer2.1.bn1.running_var"][11] = 0.0
    path = tmp_path_factory.mktemp("ckpt") / "audio_resnet18.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 30}, path)
    return path, {"layer1.1.bn2": {7}, "layer3.0.bn1": {40}}


@pytest.fixture(scope="module")
def wav_flac_probe(tmp_path_factory) -> Path:
    """Real 44.1 kHz stereo recordings-to-be: tones, noise and chirps as WAV and FLAC."""
    folder = tmp_path_factory.mktemp("probe")
    rng = np.random.default_rng(0)
    sr = 44100
    t = np.arange(int(1.5 * sr)) / sr
    for i in range(5):
        left = 0.3 * np.sin(2 * np.pi * (300 + 250 * i) * t * (1 + 0.3 * t))
        right = 0.2 * rng.standard_normal(t.size) * np.exp(-t * (i + 1))
        clip = np.stack([left, right], axis=1).astype(np.float32)
        sf.write(folder / f"clip{i}.{'flac' if i % 2 else 'wav'}", clip, sr)
    (folder / "notes.txt").write_text("not audio")
    return folder


def test_static_scan_of_the_real_mobilenet_v2(mobilenet_v2_path):
    result = run_inprocess("scan", mobilenet_v2_path, "--json", "-")
    assert result.code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["schema"] == "bnfix.scan/1"
    (ckpt,) = doc["checkpoints"]
    summary = ckpt["summary"]
    assert ckpt["architecture"] == "mobilenet_v2"
    assert ckpt["sha256"] == "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
    assert summary["bn_layers"] == 52 and summary["channels"] == 17_056
    # collapsed channels, computed independently from the raw file
    raw = torch.load(mobilenet_v2_path, weights_only=True)
    expected = {
        key.removesuffix(".running_var"): (value < 1e-6).nonzero().flatten().tolist()
        for key, value in raw.items()
        if key.endswith("running_var")
    }
    got = {layer["name"]: layer["collapsed"] for layer in ckpt["layers"]}
    assert got == expected
    assert summary["collapsed"] == sum(map(len, expected.values())) == 158
    assert summary["dead"] is None and summary["capacity_used"] is None
    assert all(layer["dead"] is None for layer in ckpt["layers"])
    assert "verdict" in result.stderr  # the table and verdict go to stderr with --json -


def test_probe_scan_on_real_wav_and_flac_at_44k_stereo(audio_resnet, wav_flac_probe, tmp_path):
    ckpt, planted = audio_resnet
    out = tmp_path / "report.json"
    plot = tmp_path / "bars.png"
    result = run_cli("scan", ckpt, "--modality", "audio", "--probe", wav_flac_probe,
                     "--json", out, "--plot", plot, "--batch-size", "2")  # fmt: skip
    assert result.code == 0, result.stderr
    assert "resnet18" in result.stdout and "verdict:" in result.stdout
    assert "1-channel stem" in result.stdout
    entry = json.loads(out.read_text())["checkpoints"][0]
    assert entry["probe_samples"] == 5 and entry["modality"] == "audio"
    dead = {layer["name"]: set(layer["dead"]) for layer in entry["layers"] if layer["dead"]}
    assert dead == planted
    layers = {layer["name"]: layer for layer in entry["layers"]}
    assert layers["layer2.1.bn1"]["collapsed"] == [11]
    assert layers["layer3.0.bn1"]["abnormal"] == [40]
    assert layers["layer1.1.bn2"]["active_fraction"][7] == 0.0
    assert 0.2 < np.mean(layers["layer1.1.bn2"]["active_fraction"]) < 0.8
    assert entry["summary"]["capacity_used"] == pytest.approx(1 - 2 / 4800)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_several_checkpoints_side_by_side_and_fail_on(audio_resnet, tmp_path):
    ckpt, _ = audio_resnet
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    worse = {k: v.clone() for k, v in state.items()}
    worse["module.bn1.weight"][:40] = 0.0
    worse["module.bn1.bias"][:40] = -1.0
    second = tmp_path / "after.safetensors"
    save_file(worse, second)
    result = run_inprocess(
        "scan", ckpt, second, "--json", tmp_path / "both.json", "--fail-on", "0.005"
    )
    assert result.code == 1, result.stderr
    assert "side by side" in result.stdout and "fail-on" in result.stdout
    doc = json.loads((tmp_path / "both.json").read_text())
    assert [c["summary"]["always_dead"] for c in doc["checkpoints"]] == [2, 42]
    assert run_inprocess("scan", ckpt, second, "--fail-on", "0.05").code == 0


def test_unrecognised_architecture_still_gets_the_static_scan(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.ReLU(), nn.Conv2d(5, 2, 1))
    path = tmp_path / "custom.pt"
    state = model.state_dict()
    state["1.weight"][2] = 0.0
    state["1.bias"][2] = -1.0
    torch.save(state, path)
    result = run_inprocess("scan", path, "--json", "-")
    assert result.code == 0, result.stderr
    entry = json.loads(result.stdout)["checkpoints"][0]
    assert entry["architecture"] is None
    assert entry["layers"][0]["always_dead"] == [2]
    assert any("needs --arch" in note for note in entry["notes"])


def test_arch_factory_runs_a_probe_on_any_model(tmp_path, monkeypatch):
    (tmp_path / "bnfix_cli_mynet.py").write_text(
        "from torch import nn\n"
        "def build():\n"
        "    return nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU())\n"
    )
    state = {
        "0.weight": torch.randn(6, 3, 3, 3), "0.bias": torch.zeros(6),
        "1.weight": torch.tensor([1.0, 0, 1, 1, 1, 1]),
        "1.bias": torch.tensor([0.0, -2, 0, 0, 0, 0]),
        "1.running_mean": torch.zeros(6), "1.running_var": torch.ones(6),
        "1.num_batches_tracked": torch.tensor(0),
    }  # fmt: skip
    torch.save(state, tmp_path / "net.pt")
    torch.save(torch.randn(6, 3, 20, 20), tmp_path / "probe.pt")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "bnfix_cli_mynet", raising=False)
    result = run_inprocess("scan", tmp_path / "net.pt", "--arch", "bnfix_cli_mynet:build",
                           "--probe", tmp_path / "probe.pt", "--json", "-")  # fmt: skip
    sys.modules.pop("bnfix_cli_mynet", None)
    assert result.code == 0, result.stderr
    layer = json.loads(result.stdout)["checkpoints"][0]["layers"][0]
    assert layer["dead"] == [1] and layer["always_dead"] == [1]


# ----------------------------------------------------------------------------- bad input


def _evil(folder: Path) -> Path:
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {folder / 'pwned'}",))

    path = folder / "evil.pt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "x": Payload()}, path)
    return path


def _no_bn(folder: Path) -> Path:
    path = folder / "linear.safetensors"
    save_file(nn.Linear(4, 2).state_dict(), path)
    return path


def _truncated(folder: Path) -> Path:
    path = folder / "cut.pth"
    full = folder / "full.pth"
    torch.save(nn.BatchNorm2d(4).state_dict(), full)
    path.write_bytes(full.read_bytes()[:300])
    full.unlink()
    return path


def _file(name: str, data: bytes):
    def make(folder: Path) -> Path:
        (folder / name).write_bytes(data)
        return folder / name

    return make


BAD_CHECKPOINTS = {
    "missing": (lambda d: d / "nope.pt", "no such file"),
    "empty": (_file("e.pt", b""), "empty"),
    "text": (_file("t.ckpt", b"epoch,loss\n1,0.3\n"), "not a checkpoint"),
    "truncated": (_truncated, "truncated or corrupt"),
    "malicious": (_evil, "refused"),
    "no-bn": (_no_bn, "no BatchNorm layer"),
}


@pytest.mark.parametrize("case", sorted(BAD_CHECKPOINTS))
def test_bad_checkpoints_get_one_line_and_exit_2(tmp_path, case):
    make, message = BAD_CHECKPOINTS[case]
    path = make(tmp_path)
    out = tmp_path / "out.json"
    # the malicious pickle as a user runs it (a real process that must not run os.system);
    # the others through the same entry point in-process
    run = run_cli if case == "malicious" else run_inprocess
    result = run("scan", path, "--json", out)
    assert result.code == 2
    line = one_error_line(result.stderr)
    assert message in line and str(path) in line
    assert not out.exists() and not (tmp_path / "pwned").exists()
    assert result.stdout == ""


def test_bad_probe_and_arch_get_one_line_and_exit_2(audio_resnet, tmp_path):
    ckpt, _ = audio_resnet
    out = tmp_path / "out.json"
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.wav").write_bytes(b"RIFF0000WAVEjunk")
    (broken / "b.flac").write_bytes(b"")
    torch.save(torch.randn(4, 5, 32, 32), tmp_path / "five.pt")
    cases = [
        (["--probe", broken, "--modality", "audio"], "no readable audio sample"),
        (["--probe", tmp_path / "five.pt"], "cannot adapt"),
        (["--probe", tmp_path / "five.pt", "--arch", "resnet50"], "does not fit"),
        (["--arch", "resnet34"], "--arch resnet34 does not fit"),  # checked without a probe too
        (["--probe", tmp_path / "absent"], "absent"),
        (["--fail-on", "2"], "--fail-on"),
        (["--bogus"], "No such option"),
    ]
    for extra, message in cases:
        result = run_inprocess("scan", ckpt, "--json", out, *extra)
        assert result.code == 2, (extra, result.stderr)
        assert message in one_error_line(result.stderr), extra
        assert not out.exists()


def test_outputs_are_checked_before_any_work(audio_resnet, tmp_path):
    ckpt, _ = audio_resnet
    before = ckpt.read_bytes()
    result = run_inprocess("scan", ckpt, "--json", ckpt.parent / "x" / "r.json")
    assert result.code == 2 and "does not exist" in one_error_line(result.stderr)
    result = run_inprocess("scan", ckpt, "--plot", tmp_path / "bars.jpg")
    assert result.code == 2 and ".png" in one_error_line(result.stderr)
    copy = tmp_path / "in.json"
    copy.write_bytes(before)
    result = run_inprocess("scan", copy, "--json", copy)
    assert result.code == 2 and "overwrite an input" in one_error_line(result.stderr)
    assert copy.read_bytes() == before and ckpt.read_bytes() == before


def test_debug_shows_the_traceback_and_keeps_the_exit_code(tmp_path):
    """``bnfix --debug`` prints the traceback before the error line and still exits 2 (it
    re-raised, so scripts saw 1, the --fail-on code); --debug after the command is that
    command's unknown option, one line, not a traceback."""
    missing = str(tmp_path / "nope.pt")
    done = run_cli("--debug", "scan", missing)
    assert done.code == 2
    assert "Traceback (most recent call last)" in done.stderr
    assert done.stderr.strip().splitlines()[-1] == f"bnfix: error: {missing}: no such file"
    done = run_cli("scan", missing, "--debug")
    assert done.code == 2 and "Traceback" not in done.stderr
    assert "no such option" in one_error_line(done.stderr).lower()


def test_demo_runs_end_to_end(tmp_path, mobilenet_v2_path, monkeypatch):
    # stage 2 of fusion-tune: 1 epoch per arm instead of 4 (the demo's test hook); stage 1, scan,
    # repair and fold run as `bnfix demo` runs them
    monkeypatch.setenv(STAGE2_EPOCHS_ENV, "1")
    result = run_cli("demo", "--workdir", tmp_path / "demo")
    assert result.code == 0, result.stderr
    assert "verdict: mobilenet_v2 on 16 audio samples" in result.stdout
    entry = json.loads((tmp_path / "demo" / "scan.json").read_text())["checkpoints"][0]
    assert entry["sha256"].startswith("b0353104")
    assert entry["summary"]["channels"] == 17_056 and entry["summary"]["collapsed"] == 158
    assert entry["probe_samples"] == 16 and 0 < entry["summary"]["dead"] < 17_056
    assert (tmp_path / "demo" / "scan.png").stat().st_size > 10_000
    # repair: the demo's dead channels are revived; fold: exact back to plain BatchNorm
    after = result.stdout.split("[2] after: verdict:")[1]
    assert "0 of 17,056 channels dead" in after
    deviation = float(
        result.stdout.split("max eval-mode deviation on random inputs ")[1].split()[0]
    )
    assert deviation <= 1e-5
    folded = load_checkpoint(tmp_path / "demo" / "mobilenet_v2.folded.safetensors")
    assert folded.metadata["bnfix_command"] == "fold" and folded.metadata["in_channels"] == "1"
    # fusion-tune from the ImageNet visual encoder and the repaired audio encoder learns
    summary = json.loads((tmp_path / "demo" / "fusion-run" / "summary.json").read_text())
    assert summary["stage2"]["test"]["fused"] >= 0.6  # 4 classes: chance is 0.25
    assert summary["mask"]["rule"] == "adaptive" and "none" in summary["compare"]
    assert "plain joint training vs masked" in result.stdout


def test_audio_options_change_the_probe(tmp_path, mobilenet_v2_path):
    clips = tmp_path / "clips"
    sr = 22050
    t = np.arange(sr) / sr
    for i in range(3):
        sf.write(clips.mkdir(exist_ok=True) or clips / f"{i}.ogg", np.sin(2e3 * t * (i + 1)), sr)
    result = run_inprocess("scan", mobilenet_v2_path, "--probe", clips, "--modality", "audio",
                           "--frames", "200", "--mel-bins", "64", "--json", "-")  # fmt: skip
    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["checkpoints"][0]["probe_samples"] == 3
    bad = run_inprocess("scan", mobilenet_v2_path, "--probe", clips, "--audio-std", "0")
    assert bad.code == 2 and "std" in one_error_line(bad.stderr)


def test_audio_visual_checkpoint_points_to_select(audio_resnet, wav_flac_probe, tmp_path):
    """The paper's audio-visual checkpoints hold audio_net.* and visual_net.* side by side."""
    ckpt, planted = audio_resnet
    audio = {k.removeprefix("module."): v for k, v in torch.load(ckpt)["state_dict"].items()}
    visual = torchvision.models.resnet18(num_classes=31).state_dict()
    both = {f"audio_net.{k}": v for k, v in audio.items()}
    both |= {f"visual_net.{k}": v for k, v in visual.items()}
    path = tmp_path / "av.pt"
    torch.save({"model": both}, path)

    static = run_inprocess("scan", path, "--json", "-")
    assert static.code == 0, static.stderr
    entry = json.loads(static.stdout)["checkpoints"][0]
    assert entry["summary"]["bn_layers"] == 40 and entry["architecture"] is None
    assert any("audio_net. (resnet18), visual_net. (resnet18)" in n for n in entry["notes"])

    probed = run_inprocess("scan", path, "--probe", wav_flac_probe)
    assert probed.code == 2 and "--select audio_net." in one_error_line(probed.stderr)

    selected = run_inprocess("scan", path, "--select", "audio_net.", "--probe", wav_flac_probe,
                             "--json", "-")  # fmt: skip
    assert selected.code == 0, selected.stderr
    entry = json.loads(selected.stdout)["checkpoints"][0]
    dead = {layer["name"]: set(layer["dead"]) for layer in entry["layers"] if layer["dead"]}
    assert entry["architecture"] == "resnet18" and dead == planted


def test_audio_pretrained_checkpoint_probed_on_images(audio_resnet, tmp_path):
    """The paper's other direction: an audio ResNet-18 (1-channel stem) on RGB frames."""
    from PIL import Image

    ckpt, planted = audio_resnet
    frames = tmp_path / "video" / "clip0"
    frames.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(4):
        pixels = (rng.random((120, 160, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(frames / f"frame{i:03d}.png")
    result = run_inprocess("scan", ckpt, "--modality", "visual", "--probe", tmp_path / "video",
                           "--image-size", "64", "--json", "-")  # fmt: skip
    assert result.code == 0, result.stderr
    entry = json.loads(result.stdout)["checkpoints"][0]
    assert entry["probe_samples"] == 4 and entry["modality"] == "visual"
    assert "probe adapted from 3 to 1 input channels" in entry["notes"]
    dead = {layer["name"]: set(layer["dead"]) for layer in entry["layers"] if layer["dead"]}
    assert dead == planted


# --- outputs: refused before the work, never destroying a file ------------------------------


@pytest.fixture
def small_ckpt(tmp_path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "m.pt"
    torch.save(torchvision.models.mnasnet0_5(num_classes=4).state_dict(), path)
    return path


def test_outputs_that_would_destroy_a_file_are_refused_before_any_work(tmp_path, small_ckpt):
    """repair --out r.json --json r.json wrote the checkpoint, then the report over it (exit
    0); a --plot inside the probe folder replaced a probe image, read as a sample next time;
    an existing --json was replaced without --force; '--out -' wrote a file named '-'."""
    from PIL import Image

    probe = tmp_path / "imgs"
    probe.mkdir()
    for i in range(2):
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(probe / f"{i}.png")
    kept = (probe / "0.png").read_bytes()
    (tmp_path / "old.json").write_text("{}")
    cases = [
        (("repair", small_ckpt, "--modality", "visual", "--out", tmp_path / "r.json",
          "--json", tmp_path / "r.json"), "--json and --out name the same file"),
        (("repair", small_ckpt, "--modality", "visual", "--json",
          tmp_path / "m.abri.safetensors"), "--json must name a .json file"),
        (("scan", small_ckpt, "--probe", probe, "--modality", "visual", "--plot",
          probe / "0.png"), "--plot is inside the input folder"),
        (("repair", small_ckpt, "--modality", "visual", "--probe", probe, "--out",
          probe / "x.safetensors", "--force"), "--out is inside the input folder"),
        (("scan", small_ckpt, "--json", tmp_path / "old.json"), "exists; pass --force"),
        (("scan", small_ckpt, "--json", tmp_path), "--json must name a .json file"),
        (("repair", small_ckpt, "--modality", "visual", "--out", "-"), "--out -: this output"),
        (("fold", small_ckpt, "--out", "-"), "--out -: this output"),
        (("manifest", "folders", tmp_path, "--out", "-"), "--out -: the manifest is a file"),
        (("scan", small_ckpt, "--probe", probe, "--modality", "visual", "--probe-limit", "2",
          "--seed", str(10**30)), "--seed"),
        (("scan", small_ckpt, "--probe", probe, "--modality", "visual", "--image-size",
          "99999"), "--image-size"),
    ]  # fmt: skip
    before = sorted(p.name for p in tmp_path.iterdir())
    for args, message in cases:
        done = run_inprocess(*args)
        assert done.code == 2, (args, done.stderr)
        assert message in one_error_line(done.stderr), (args, done.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (probe / "0.png").read_bytes() == kept and (tmp_path / "old.json").read_text() == "{}"
    done = run_inprocess("scan", small_ckpt, "--json", tmp_path / "old.json", "--force")
    assert done.code == 0 and json.loads((tmp_path / "old.json").read_text())["checkpoints"]


def test_outputs_follow_the_umask_and_long_names_fit(tmp_path, small_ckpt):
    """Atomic writes went through mkstemp's 0600 file, so every output was private; and the
    temporary name (the output's own plus 14 characters) made a legal 250-byte name too long
    after all the work was done."""
    old = os.umask(0o022)
    try:
        out = tmp_path / ("y" * 240 + ".safetensors")
        done = run_inprocess("repair", small_ckpt, "--modality", "visual", "--out", out,
                             "--json", tmp_path / "r.json")  # fmt: skip
    finally:
        os.umask(old)
    assert done.code == 0, done.stderr
    for path in (out, tmp_path / "r.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


_SLOW_WRITE = """
import os, sys, time
from pathlib import Path
from bnfix import cli
ready = Path(sys.argv[1])
real_fsync = os.fsync
def slow_fsync(fd):  # a slow disk: the output's bytes are out, not yet on disk
    ready.touch()
    time.sleep(30)
    real_fsync(fd)
os.fsync = slow_fsync
cli.main(sys.argv[2:])
"""


def test_sigterm_while_writing_leaves_no_temporary_file(tmp_path, small_ckpt):
    """SIGTERM (a scheduler's or a container's stop) killed the process mid-write and left a
    full-size hidden temporary file beside the output; it now ends the run as an interrupt
    does: exit 143, nothing left."""
    ready, out = tmp_path / "ready", tmp_path / "out" / "r.safetensors"
    out.parent.mkdir()
    args = ["repair", str(small_ckpt), "--modality", "visual", "--out", str(out)]
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_WRITE, str(ready), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert ready.exists(), proc.communicate()
    assert [p.name.endswith(".tmp") for p in out.parent.iterdir()] == [True]  # mid-write
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    assert list(out.parent.iterdir()) == []
    assert b"Traceback" not in stderr
