"""Probe inputs for models beyond 2-D: clips for 3-D video models, raw waves for 1-D models."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchvision
from helpers import one_error_line, run_inprocess
from PIL import Image
from safetensors.torch import save_file

from bnfix.probe import AudioOptions, ClipOptions, adapt_channels, load_probe
from bnfix.probe_clip import even_indices

WAVE_MODEL = """
from torch import nn

def build():
    return nn.Sequential(
        nn.Conv1d(1, 8, 64, stride=8), nn.BatchNorm1d(8), nn.ReLU(),
        nn.Conv1d(8, 16, 9, stride=4), nn.BatchNorm1d(16), nn.ReLU(),
        nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(16, 5),
    )
"""


@pytest.fixture(scope="module")
def frame_folders(tmp_path_factory) -> Path:
    """Three clips as folders of frames (as extracted from videos), of 5, 7 and 3 frames."""
    root = tmp_path_factory.mktemp("clips")
    rng = np.random.default_rng(0)
    for c, n in enumerate([5, 7, 3]):
        folder = root / f"clip{c}"
        folder.mkdir()
        for i in range(n):
            pixels = rng.integers(0, 255, (36, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"frame_{i:04d}.png")
    return root


def test_even_indices_pick_segment_centres() -> None:
    assert even_indices(10, 5) == [1, 3, 5, 7, 9]
    assert even_indices(3, 6) == [0, 0, 1, 1, 2, 2]  # a short folder repeats frames
    assert even_indices(1, 4) == [0, 0, 0, 0]


def test_a_folder_of_frame_folders_is_one_clip_each(frame_folders: Path) -> None:
    opts = ClipOptions(frames=4, size=16, resize=(20, 24))
    probe = load_probe(frame_folders, "visual", clip=opts)
    assert probe.tensor.shape == (3, 3, 4, 16, 16) and probe.files == 3
    assert [Path(s).name for s in probe.sources] == ["clip0", "clip1", "clip2"]
    # frame 1 of clip0 (index 1 of 5 for T=4: (0.5·5/4) → 1) is the clip's first time step
    import torchvision.transforms.v2.functional as TF

    frame = torch.from_numpy(np.array(Image.open(frame_folders / "clip0" / "frame_0000.png")))
    frame = frame.permute(2, 0, 1)
    x = TF.center_crop(TF.resize(frame, [20, 24], antialias=False), [16, 16]).float() / 255
    mean, std = torch.tensor(opts.mean)[:, None, None], torch.tensor(opts.std)[:, None, None]
    assert torch.allclose(probe.tensor[0, :, 0], (x - mean) / std, atol=1e-5)
    limited = load_probe(frame_folders, "visual", limit=2, clip=opts, seed=1)
    assert limited.tensor.shape[0] == 2 and limited.files == 3


def test_presets_follow_torchvision_video_weights() -> None:
    weights = torchvision.models.get_weight("R2Plus1D_18_Weights.KINETICS400_V1").transforms()
    opts = ClipOptions.for_architecture("r2plus1d_18")
    assert (opts.size, opts.resize) == (weights.crop_size[0], tuple(weights.resize_size))
    assert opts.mean == tuple(weights.mean) and opts.std == tuple(weights.std)
    s3d = torchvision.models.get_weight("S3D_Weights.KINETICS400_V1").transforms()
    assert ClipOptions.for_architecture("s3d").size == s3d.crop_size[0]


def test_scan_and_repair_a_video_model_on_clips(frame_folders: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)  # mc3_18: the smallest torchvision video ResNet (a third of r2plus1d_18)
    path = tmp_path / "mc3_18.safetensors"
    model = torchvision.models.video.mc3_18()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    out = tmp_path / "scan.json"
    args = ("--probe", frame_folders, "--clip-frames", "4", "--clip-size", "32")
    done = run_inprocess("scan", path, "--modality", "visual", *args, "--json", out)
    assert done.code == 0, done.stderr
    doc = json.loads(out.read_text())["checkpoints"][0]
    assert doc["architecture"] == "mc3_18" and doc["probe_samples"] == 3
    assert doc["summary"]["unjudged_layers"] == 0

    repaired = tmp_path / "mc3_18.keep.safetensors"
    done = run_inprocess(
        "repair", path, "--modality", "visual", "--strategy", "keep", "--recalibrate",
        "--out", repaired, *args,
    )  # fmt: skip
    assert done.code == 0, done.stderr
    from bnfix.checkpoint import load_checkpoint

    written = load_checkpoint(repaired)
    assert written.metadata["recalibrated"].startswith("yes")
    fresh = torchvision.models.video.mc3_18()
    fresh.load_state_dict(written.state_dict)  # strict: the stock layout
    assert not torch.equal(fresh.stem[1].running_var, torch.ones(64))  # estimated on the clips


def test_a_2d_probe_on_a_3d_model_is_one_line(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = tmp_path / "mc3.safetensors"
    save_file(
        {k: v.contiguous() for k, v in torchvision.models.video.mc3_18().state_dict().items()},
        path,
    )
    probe = tmp_path / "batch.pt"
    torch.save(torch.randn(4, 3, 32, 32), probe)
    done = run_inprocess("scan", path, "--probe", probe)
    assert done.code == 2
    line = one_error_line(done.stderr)
    assert "[4, 3, 32, 32]" in line and "Conv3d" in line and "[N, C, T, H, W]" in line


def test_clip_frames_zero_is_refused(frame_folders: Path, tmp_path: Path) -> None:
    done = run_inprocess("scan", tmp_path / "x.pt", "--probe", frame_folders, "--clip-frames", "0")
    assert done.code == 2 and "--clip-frames" in one_error_line(done.stderr)


def test_waveform_probe_feeds_a_batchnorm1d_model(tmp_path: Path, monkeypatch) -> None:
    module = tmp_path / "wave_model_probe.py"
    module.write_text(WAVE_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("wave_model_probe", None)
    from wave_model_probe import build

    torch.manual_seed(0)
    ckpt = tmp_path / "wave.safetensors"
    save_file({k: v.contiguous() for k, v in build().state_dict().items()}, ckpt)
    clips = tmp_path / "wav"
    clips.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):  # 0.5 s at 22.05 kHz, stereo: resampled, mixed, padded to 1 s
        sf.write(clips / f"c{i}.wav", 0.1 * rng.standard_normal((11025, 2)), 22050)
    probe = load_probe(clips, "audio", audio=AudioOptions(input="waveform", seconds=1.0))
    assert probe.tensor.shape == (4, 1, 16000)
    assert torch.all(probe.tensor[:, :, 8100:] == 0)  # padding past the half second
    out = tmp_path / "scan.json"
    done = run_inprocess(
        "scan", ckpt, "--arch", "wave_model_probe:build", "--modality", "audio", "--probe",
        clips, "--audio-input", "waveform", "--seconds", "1", "--json", out,
    )  # fmt: skip
    assert done.code == 0, done.stderr
    doc = json.loads(out.read_text())["checkpoints"][0]
    assert [x["name"] for x in doc["layers"]] == ["1", "4"]
    assert all(x["dead"] is not None for x in doc["layers"])
    # the fbank probe does not fit a Conv1d stem: one line naming both shapes
    done = run_inprocess("scan", ckpt, "--arch", "wave_model_probe:build", "--probe", clips)
    assert done.code == 2 and "Conv1d" in one_error_line(done.stderr)
    # a saved [N, 1, samples] batch (read as [N, 1, 1, samples]): scan took it, repair
    # refused it with torch's shape error
    torch.save(probe.tensor, tmp_path / "waves.pt")
    args = ("--arch", "wave_model_probe:build", "--modality", "audio", "--probe",
            tmp_path / "waves.pt")  # fmt: skip
    assert run_inprocess("scan", ckpt, *args).code == 0
    out = tmp_path / "wave.abri.safetensors"
    done = run_inprocess("repair", ckpt, *args, "--recalibrate", "--out", out)
    assert done.code == 0, done.stderr
    assert "on 4 audio samples" in done.stdout and out.exists()


def test_adapt_channels_works_for_every_rank() -> None:
    clip = torch.randn(2, 1, 4, 8, 8)
    assert torch.equal(adapt_channels(clip, 3, dims=3)[:, 2], clip[:, 0])
    wave = torch.randn(2, 3, 100)
    assert torch.allclose(adapt_channels(wave, 1, dims=1)[:, 0], wave.mean(dim=1))
    saved = torch.randn(2, 1, 1, 100)  # a saved [N, 1, samples] batch, read as 4-D
    assert adapt_channels(saved, 1, dims=1).shape == (2, 1, 100)
