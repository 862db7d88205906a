"""fusion-tune on a manifest of real video files (H.264 + AAC .mp4, made here with PyAV).

The same generated clips are given twice: as WAV files + frame folders, and encoded into one
``.mp4`` per clip through the ``video`` column. The features agree within codec error and a
run on the videos learns like the run on the WAV + frames.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
from helpers import fusion_toml
from PIL import Image
from rich.console import Console

from bnfix.fusion.config import config_from_toml
from bnfix.fusion.features import VisualOptions, load_features
from bnfix.fusion.manifest import read_manifest
from bnfix.fusion.run import fusion_tune
from bnfix.fusion.synthetic import write_synthetic_av
from bnfix.probe_audio import AudioOptions

FPS = 4  # frames per second of the encoded videos: 3 frames over 0.75 s


def _encode(frames: list[Path], wav: Path, out: Path) -> None:
    """The clip's frames as H.264 (near-lossless) at FPS and its WAV as AAC, in one .mp4."""
    wave, rate = sf.read(wav, dtype="float32", always_2d=True)
    with av.open(str(out), "w") as container:
        video = container.add_stream("libx264", rate=FPS)
        first = np.asarray(Image.open(frames[0]))
        video.height, video.width = first.shape[:2]
        video.pix_fmt = "yuv444p"
        video.options = {"crf": "0"}
        sound = container.add_stream("aac", rate=rate)
        sound.layout = "mono"
        for i, f in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.asarray(Image.open(f).convert("RGB")), "rgb24")
            frame.pts = i
            container.mux(video.encode(frame))
        container.mux(video.encode())
        step = sound.codec_context.frame_size or 1024
        data = np.ascontiguousarray(wave.T)
        for start in range(0, data.shape[1], step):
            chunk = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(data[:, start : start + step]), format="fltp", layout="mono"
            )
            chunk.sample_rate, chunk.pts = rate, start
            container.mux(sound.encode(chunk))
        container.mux(sound.encode())


@pytest.fixture(scope="module")
def two_manifests(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("avvideo")
    files = write_synthetic_av(folder, classes=4, per_class=20, seed=0, seconds=0.75, image_size=32)
    rows = list(csv.DictReader(files.open()))
    videos = folder / "videos"
    videos.mkdir()
    for row in rows:
        frames = sorted((folder / row["frames"]).iterdir())
        _encode(frames, folder / row["audio"], videos / f"{row['id']}.mp4")
    manifest = folder / "videos.csv"
    with manifest.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "label", "split", "video"])
        for row in rows:
            writer.writerow([row["id"], row["label"], row["split"], f"videos/{row['id']}.mp4"])
    return files, manifest


def test_video_features_match_wav_and_frames_within_codec_error(two_manifests, tmp_path) -> None:
    files, videos = two_manifests
    m_files, m_videos = read_manifest(files), read_manifest(videos)
    assert m_videos.modalities == ("audio", "visual") and m_videos.classes == m_files.classes
    assert m_videos.samples[0].audio == m_videos.samples[0].frames  # one file, both modalities
    audio = AudioOptions(num_mel_bins=32, target_frames=64, mean=0.0, std=1.0)
    visual = VisualOptions(frames=3, size=28)
    quiet = Console(quiet=True)
    a = load_features(m_files, audio, visual, tmp_path / "a", quiet, workers=1)
    b = load_features(m_videos, audio, visual, tmp_path / "b", quiet, workers=2)
    assert a.ids == b.ids and b.skipped == []
    # Frames: lossless H.264 in 4:4:4 -> within 2 grey levels after the same resize.
    diff = (a.visual[:].int() - b.visual[:].int()).abs().float()
    assert diff.mean() < 2.0, diff.mean()
    # Audio: AAC at the default bit rate; log-mel values where the WAV has energy.
    fa, fb = a.audio[:], b.audio[:]
    loud = fa > fa.mean()
    assert (fa - fb)[loud].abs().mean() < 0.5, (fa - fb)[loud].abs().mean()
    # sampling = "random" stores the frames at fps: 0.75 s at 4 fps = the 3 encoded frames.
    random = VisualOptions(frames=2, size=28, sampling="random", fps=4.0, max_frames=4)
    c = load_features(m_videos, audio, random, tmp_path / "c", quiet, ("visual",), workers=2)
    assert c.visual_frames.tolist() == [3] * len(c.ids) and c.visual.shape[1] == 4
    assert (c.visual[:, :3].int() - a.visual[:].int()).abs().float().mean() < 2.0  # the same 3


def test_a_run_on_videos_learns_like_one_on_wav_and_frames(two_manifests, tmp_path) -> None:
    files, videos = two_manifests
    results = {}
    for name, manifest in (("files", files), ("videos", videos)):
        changes = {
            "data": {"cache_dir": tmp_path / name / "cache", "workers": 1},
            "data.audio": {"mel_bins": 32, "target_frames": 64},
            "data.visual": {"frames": 3, "size": 28},
            "stage1": {"epochs": 4},
            "stage2": {"epochs": 2},
            "mask": {"audio_patch": [16, 8]},
            "run": {"out_dir": tmp_path / name / "out"},
        }
        config = config_from_toml(fusion_toml(manifest, changes), tmp_path)
        results[name] = fusion_tune(config, console=Console(quiet=True), plot=False)
    for name in results:
        stage1 = results[name]["stage1"]
        assert stage1["audio"]["test"] >= 0.6, (name, stage1)  # 4 classes: chance is 1/4
        assert results[name]["stage2"]["test"]["fused"] >= 0.6, (name, results[name]["stage2"])
    gap = abs(
        results["files"]["stage2"]["test"]["fused"] - results["videos"]["stage2"]["test"]["fused"]
    )
    assert gap <= 0.25, results


def test_unreadable_videos_are_skipped_by_id_with_their_reason(two_manifests, tmp_path) -> None:
    """A video without an audio track, a truncated one and a zero-byte one, in a manifest of
    good videos: skipped and reported by id, the rest extracted."""
    from bnfix.media.synth import write_video

    _, videos = two_manifests
    folder = videos.parent
    write_video(folder / "videos" / "mute.mp4", 1.0, width=32, height=32)  # no audio track
    good = (folder / "videos" / "c0_000.mp4").read_bytes()
    (folder / "videos" / "cut.mp4").write_bytes(good[: len(good) // 3])
    (folder / "videos" / "empty.mp4").write_bytes(b"")
    rows = videos.read_text().splitlines()
    rows += [f"{name},class0,train,videos/{name}.mp4" for name in ("mute", "cut", "empty")]
    manifest = folder / "with_bad_videos.csv"
    manifest.write_text("\n".join(rows) + "\n")
    audio = AudioOptions(num_mel_bins=32, target_frames=64)
    log = Console(width=200, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
    fs = load_features(
        read_manifest(manifest), audio, VisualOptions(frames=3, size=28), tmp_path / "c", log,
        workers=2,
    )  # fmt: skip
    reasons = dict(fs.skipped)
    assert sorted(reasons) == ["cut", "empty", "mute"]
    assert "no audio track" in reasons["mute"]
    assert all(r.startswith("audio: ") or r.startswith("visual: ") for r in reasons.values())
    assert len(fs.ids) == len(rows) - 1 - 3
    text = log.export_text()
    assert "skipped 3 of" in text and all(f"  {i}: " in text for i in reasons)


def test_a_run_lists_every_skipped_sample_in_its_out_dir(two_manifests, tmp_path) -> None:
    """fusion-tune on videos with three unreadable ones: ``out_dir/skipped.csv`` holds each
    id with its reason (the console shows only the first few of a large dataset); it is one
    of the run's outputs, which --force clears (a run reading everything writes none)."""
    from bnfix.media.synth import write_video

    _, videos = two_manifests
    bad = tmp_path / "bad"
    bad.mkdir()
    write_video(bad / "mute.mp4", 1.0, width=32, height=32)  # no audio track
    (bad / "empty.mp4").write_bytes(b"")
    rows = videos.read_text().splitlines()
    rows += [f"{name},class0,train,{bad / name}.mp4" for name in ("mute", "empty")]
    manifest = videos.parent / "with_two_bad.csv"
    manifest.write_text("\n".join(rows) + "\n")
    changes = {
        "data": {"cache_dir": tmp_path / "cache", "workers": 1},
        "data.visual": {"size": 28},
        "run": {"out_dir": tmp_path / "out"},
    }
    fusion_tune(
        config_from_toml(fusion_toml(manifest, changes), tmp_path), console=Console(quiet=True),
        plot=False, stage="1",
    )  # fmt: skip
    listed = list(csv.DictReader((tmp_path / "out" / "skipped.csv").open()))
    reasons = {row["id"]: row["reason"] for row in listed}
    assert sorted(reasons) == ["empty", "mute"] and "no audio track" in reasons["mute"]
    fusion_tune(
        config_from_toml(fusion_toml(videos, changes), tmp_path), console=Console(quiet=True),
        plot=False, stage="1", force=True,
    )  # fmt: skip
    assert not (tmp_path / "out" / "skipped.csv").exists()
