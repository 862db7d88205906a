"""A small generated audio-visual data set, for the demo and the tests.

Each class has a tone (audio) and a colour (visual). Audio is the easy modality: a clear tone
over mild noise, except on a quarter of the clips where the tone is almost inaudible. Visual
is harder: the class colour is a faint tint of a square at a random place on a noisy frame,
except on a quarter of the samples where it is vivid. So per-sample confidences differ between
the modalities in both directions, which gives the stage-2 mask rules something to do.

Real files are written (WAV via soundfile, PNG frame folders via Pillow, a manifest CSV) so
the whole data path — decoding, features, cache — is exercised.
"""

from __future__ import annotations

import colorsys
import csv
from pathlib import Path

import numpy as np
from torch import nn

__all__ = ["demo_config", "tiny_cnn", "write_demo_config", "write_synthetic_av"]

SPLITS = ("train", "train", "train", "val", "test")  # 60 / 20 / 20 per class


def write_synthetic_av(
    folder: str | Path,
    classes: int = 4,
    per_class: int = 30,
    seed: int = 0,
    *,
    modalities: tuple[str, ...] = ("audio", "visual"),
    sample_rate: int = 16000,
    seconds: float = 1.0,
    image_size: int = 48,
    frames: int = 3,
    splits: tuple[str, ...] = SPLITS,
    quiet_audio: float = 0.25,
    vivid_visual: float = 0.25,
) -> Path:
    """Write ``classes * per_class`` samples under ``folder``; returns the manifest's path.

    Splits cycle through ``splits`` within each class (default train, train, train, val,
    test). ``modalities`` limits the manifest's columns (a one-modality data set).
    """
    if not 2 <= classes <= 8:
        raise ValueError("classes must be between 2 and 8")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for label in range(classes):
        for i in range(per_class):
            sample_id = f"c{label}_{i:03d}"
            row = {"id": sample_id, "label": f"class{label}", "split": splits[i % len(splits)]}
            if "audio" in modalities:
                audio = folder / "audio" / f"{sample_id}.wav"
                _write_clip(audio, label, rng, sample_rate, seconds, quiet_audio)
                row["audio"] = audio.relative_to(folder).as_posix()
            if "visual" in modalities:
                clip = folder / "frames" / sample_id
                _write_frames(clip, label, classes, rng, image_size, frames, vivid_visual)
                row["frames"] = clip.relative_to(folder).as_posix()
            rows.append(row)
    columns = ["id", *(c for c in ("audio", "frames") if c in rows[0]), "label", "split"]
    manifest = folder / "manifest.csv"
    with open(manifest, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def _write_clip(
    path: Path,
    label: int,
    rng: np.random.Generator,
    sample_rate: int,
    seconds: float,
    quiet: float = 0.25,
) -> None:
    import soundfile as sf

    path.parent.mkdir(parents=True, exist_ok=True)
    n = int(seconds * sample_rate)
    t = np.arange(n) / sample_rate
    frequency = 400.0 * 1.5**label * rng.uniform(0.97, 1.03)
    amplitude = rng.uniform(0.004, 0.01) if rng.random() < quiet else rng.uniform(0.15, 0.4)
    onset = rng.uniform(0, 0.3) * seconds
    envelope = np.clip((t - onset) / 0.02, 0, 1)
    tone = amplitude * envelope * np.sin(2 * np.pi * frequency * t + rng.uniform(0, 2 * np.pi))
    noise = 0.05 * rng.standard_normal(n)
    sf.write(path, (tone + noise).astype(np.float32), sample_rate)


def _class_colour(label: int, classes: int) -> np.ndarray:
    r, g, b = colorsys.hsv_to_rgb(label / classes, 1.0, 1.0)
    return np.array([r, g, b]) * 2 - 1  # in [-1, 1] around grey


def _write_frames(
    folder: Path,
    label: int,
    classes: int,
    rng: np.random.Generator,
    size: int,
    frames: int,
    vivid: float = 0.25,
) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    strength = rng.uniform(70, 100) if rng.random() < vivid else rng.uniform(12, 30)
    colour = _class_colour(label, classes) * strength
    side = size // 3
    y, x = rng.integers(0, size - side, size=2)
    for f in range(frames):
        image = 128 + 45 * rng.standard_normal((size, size, 3))
        dy, dx = rng.integers(-2, 3, size=2)  # the square jitters between frames
        top, left = int(np.clip(y + dy, 0, size - side)), int(np.clip(x + dx, 0, size - side))
        image[top : top + side, left : left + side] += colour
        pixels = np.clip(image, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{f:04d}.png")


def tiny_cnn() -> nn.Module:
    """A small 4-layer CNN with BatchNorm and a classifier: fast on a CPU, for tests and demos.

    Use as ``model.audio_arch = "bnfix.fusion.synthetic:tiny_cnn"``.
    """

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(3, 16),
        *block(16, 32),
        *block(32, 64),
        *block(64, 64),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


def demo_config(manifest: str | Path, out_dir: str | Path, arch: str = "resnet18") -> str:
    """A config (TOML text) sized for a laptop CPU: small inputs, a few epochs per stage."""
    return f"""\
# fusion-tune on the synthetic set: small inputs so that a CPU finishes in a minute or two.
[data]
manifest = "{Path(manifest).as_posix()}"

[data.audio]
sample_rate = 16000
mel_bins = 64
target_frames = 96

[data.visual]
frames = 2
size = 40

[model]
audio_arch = "{arch}"
visual_arch = "{arch}"

[stage1]
epochs = 4
batch_size = 16
lr = 0.02

[stage2]
epochs = 4
batch_size = 16
lr = 0.01

[mask]
rule = "adaptive"
audio_patch = [16, 8]
visual_patch = [8, 8]

[run]
out_dir = "{Path(out_dir).as_posix()}"
seed = 0
"""


def write_demo_config(
    folder: str | Path, manifest: str | Path, out_dir: str | Path, arch: str = "resnet18"
) -> Path:
    """Write :func:`demo_config` as ``folder/fusion_tune.toml``; returns its path."""
    path = Path(folder) / "fusion_tune.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(demo_config(manifest, out_dir, arch))
    return path
