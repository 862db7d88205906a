"""Video files and compressed audio as probes: `bnfix scan/repair --probe` on a folder of videos.

A video gives an audio probe its audio track, a 2-D visual model its middle frame and a 3-D
model a clip of T frames at its segment centres, through the same transforms as audio files,
images and frame folders. Files that cannot serve (no audio track, truncated, empty) are
skipped and named. All files are real, encoded here with PyAV.
"""

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

from bnfix.errors import BnfixError
from bnfix.media import read_audio, read_frames, read_segments, segment_times
from bnfix.media.synth import frame_index, write_audio, write_video
from bnfix.probe import AudioOptions, ClipOptions, ImageOptions, load_probe, normalise
from bnfix.probe_audio import features_with_length
from bnfix.probe_clip import clip_features
from bnfix.probe_image import image_features

RATE = 48000
SMALL_AUDIO = AudioOptions(num_mel_bins=32, target_frames=64)
SMALL_IMAGE = ImageOptions(size=32, resize=36)
SMALL_CLIP = ClipOptions(frames=4, size=16, resize=(20, 24))
H264 = {"codec": "libx264", "options": {"crf": "18"}, "gop": 12}
VP9 = {"codec": "libvpx-vp9", "options": {"crf": "30", "b:v": "0", "deadline": "realtime"}}

CLIP3D = """
from torch import nn

def build():
    return nn.Sequential(
        nn.Conv3d(3, 8, 3, stride=(1, 2, 2), padding=1), nn.BatchNorm3d(8), nn.ReLU(),
        nn.Conv3d(8, 16, 3, stride=2, padding=1), nn.BatchNorm3d(16), nn.ReLU(),
        nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(16, 5),
    )
"""


def sound(seconds: float, seed: int) -> np.ndarray:
    """``[2, samples]`` at 48 kHz: a tone and noise, different per file."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * RATE)) / RATE
    mono = 0.2 * np.sin(2 * np.pi * (200 + 100 * seed) * t) + 0.05 * rng.standard_normal(t.size)
    return np.stack([mono, mono]).astype(np.float32)


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    """Six video files, two of them unreadable, two without an audio track (one nested)."""
    root = tmp_path_factory.mktemp("videos")
    (root / "sub").mkdir()
    write_video(root / "a.mp4", 1.6, **H264, audio=sound(1.6, 0), audio_codec="aac")
    write_video(root / "b.webm", 1.6, **VP9, audio=sound(1.6, 1), audio_codec="libopus")
    write_video(root / "sub" / "c.avi", 1.6, codec="mpeg4", options={"qscale": "3"})
    write_video(root / "sub" / "d.mp4", 1.6, **H264)
    whole = (root / "a.mp4").read_bytes()
    (root / "broken.mp4").write_bytes(whole[: len(whole) // 2])
    (root / "empty.mkv").write_bytes(b"")
    return root


@pytest.fixture(scope="module")
def sounds(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sounds")
    write_audio(root / "e.mp3", sound(1.0, 2), RATE, "mp3")
    write_audio(root / "f.m4a", sound(1.0, 3), RATE, "aac")
    write_audio(root / "g.opus", sound(1.0, 4), RATE, "libopus")
    sf.write(root / "h.wav", sound(1.0, 5).T, RATE)
    return root


def names(paths: list[str]) -> list[str]:
    return [Path(p).name for p in paths]


def test_audio_probe_reads_each_videos_audio_track(clips: Path) -> None:
    probe = load_probe(clips, "audio", audio=SMALL_AUDIO)
    assert names(probe.sources) == ["a.mp4", "b.webm"] and probe.modality == "audio"
    assert probe.files == 6 and probe.tensor.shape == (2, 1, 64, 32)
    reasons = {Path(f).name: r for f, r in probe.skipped}
    assert reasons["c.avi"] == reasons["d.mp4"] == "no audio track"
    assert reasons["broken.mp4"].startswith("cannot decode audio: ")
    assert reasons["empty.mkv"].startswith("cannot decode audio: ")
    # the same fbank path as an audio file: decode, features, probe-wide normalisation
    tracks = [read_audio(clips / name, SMALL_AUDIO) for name in ("a.mp4", "b.webm")]
    feats = [features_with_length(wave, rate, SMALL_AUDIO) for wave, rate in tracks]
    expected = normalise(torch.stack([f for f, _ in feats]), [n for _, n in feats], SMALL_AUDIO)
    assert torch.equal(probe.tensor, expected)


def test_visual_probe_takes_each_videos_middle_frame(clips: Path) -> None:
    probe = load_probe(clips, "visual", image=SMALL_IMAGE)
    assert names(probe.sources) == ["a.mp4", "b.webm", "c.avi", "d.mp4"]
    assert probe.tensor.shape == (4, 3, 32, 32) and probe.modality == "visual"
    assert sorted(names([f for f, _ in probe.skipped])) == ["broken.mp4", "empty.mkv"]
    middle = read_segments(clips / "a.mp4", 1)
    assert frame_index(middle[0].numpy()) == 20  # t = 0.8 s at 25 fps
    assert torch.equal(probe.tensor[0], image_features(middle[0], SMALL_IMAGE))
    limited = load_probe(clips, "visual", limit=2, image=SMALL_IMAGE, seed=3)
    assert limited.tensor.shape[0] == 2 and limited.files == 6


def test_clip_probe_takes_t_frames_at_the_segment_centres(clips: Path) -> None:
    probe = load_probe(clips, "visual", clip=SMALL_CLIP)
    assert names(probe.sources) == ["a.mp4", "b.webm", "c.avi", "d.mp4"]
    assert probe.tensor.shape == (4, 3, 4, 16, 16) and probe.files == 6
    frames = read_frames(clips / "sub" / "c.avi", segment_times(1.6, 4))
    assert [frame_index(f.numpy()) for f in frames] == [5, 15, 25, 35]
    assert torch.equal(probe.tensor[2], clip_features(frames, SMALL_CLIP))
    # a 3-D model leaves no doubt about the modality; otherwise a video probe needs one
    assert load_probe(clips / "a.mp4", None, clip=SMALL_CLIP).modality == "visual"
    with pytest.raises(BnfixError, match="hold sound and pictures: pass a modality"):
        load_probe(clips, None)
    with pytest.raises(BnfixError, match=r"cannot read this video file: cannot open video: "):
        load_probe(clips / "empty.mkv", "visual")


def test_compressed_audio_files_are_audio_probe_files(sounds: Path) -> None:
    probe = load_probe(sounds, "audio", audio=SMALL_AUDIO)
    assert names(probe.sources) == ["e.mp3", "f.m4a", "g.opus", "h.wav"] and not probe.skipped
    rows = probe.tensor.flatten(1)
    assert len({tuple(r.tolist()) for r in rows}) == 4  # four different sounds


def _shufflenet(path: Path) -> Path:
    torch.manual_seed(0)
    torch.save(torchvision.models.shufflenet_v2_x0_5(num_classes=10).state_dict(), path)
    return path


def test_scan_on_a_folder_of_videos(clips: Path, tmp_path: Path) -> None:
    ckpt = _shufflenet(tmp_path / "shufflenet_v2_x0_5.pt")
    out = tmp_path / "audio.json"
    small = ("--frames", "64", "--mel-bins", "32")
    done = run_inprocess(
        "scan", ckpt, "--modality", "audio", "--probe", clips, *small, "--json", out
    )
    assert done.code == 0, done.stderr
    doc = json.loads(out.read_text())["checkpoints"][0]
    assert doc["probe_samples"] == 2 and doc["summary"]["unjudged_layers"] == 0
    said = done.stdout + done.stderr
    for name in ("c.avi: no audio track", "d.mp4: no audio track", "broken.mp4", "empty.mkv"):
        assert name in said, said

    out = tmp_path / "visual.json"
    done = run_inprocess(
        "scan", ckpt, "--modality", "visual", "--probe", clips, "--image-size", "32",
        "--json", out,
    )  # fmt: skip
    assert done.code == 0, done.stderr
    assert json.loads(out.read_text())["checkpoints"][0]["probe_samples"] == 4
    said = done.stdout + done.stderr
    assert "broken.mp4: cannot open video" in said and "empty.mkv" in said

    done = run_inprocess("scan", ckpt, "--probe", clips)  # which half of the videos?
    assert done.code == 2 and "pass a modality" in one_error_line(done.stderr)


def test_scan_and_repair_of_a_3d_model_get_one_clip_per_video(
    clips: Path, tmp_path: Path, monkeypatch
) -> None:
    (tmp_path / "clip3d_probe.py").write_text(CLIP3D)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("clip3d_probe", None)
    from clip3d_probe import build

    torch.manual_seed(0)
    ckpt = tmp_path / "clip3d.pt"
    torch.save(build().state_dict(), ckpt)
    out = tmp_path / "scan.json"
    args = ("--arch", "clip3d_probe:build", "--probe", clips, "--clip-frames", "4")
    done = run_inprocess("scan", ckpt, *args, "--clip-size", "16", "--json", out)
    assert done.code == 0, done.stderr
    doc = json.loads(out.read_text())["checkpoints"][0]
    assert doc["probe_samples"] == 4 and doc["modality"] == "visual"
    assert [x["name"] for x in doc["layers"]] == ["1", "4"]
    assert all(x["dead"] is not None for x in doc["layers"])
    assert "broken.mp4: cannot open video" in done.stdout + done.stderr

    repaired = tmp_path / "clip3d.keep.pt"
    done = run_inprocess(
        "repair", ckpt, *args, "--clip-size", "16", "--modality", "visual",
        "--strategy", "keep", "--recalibrate", "--out", repaired,
    )  # fmt: skip
    assert done.code == 0, done.stderr
    from bnfix.checkpoint import load_checkpoint

    written = load_checkpoint(repaired).state_dict
    assert not torch.equal(written["1.running_var"], torch.ones(8))  # estimated on the clips
