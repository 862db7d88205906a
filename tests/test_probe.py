"""Probe loading on real files written with soundfile, Pillow, torch, numpy and safetensors."""

from __future__ import annotations

import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from bnfix.errors import BnfixError
from bnfix.probe import (
    AudioOptions,
    ImageOptions,
    Probe,
    adapt_channels,
    audio_features,
    batches,
    load_probe,
    write_demo_audio,
)

SMALL = AudioOptions(target_frames=64)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LOG_EPS = math.log(torch.finfo(torch.float32).eps)  # kaldi.fbank's floor under log()


def tone(freq: float, seconds: float, sr: int, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def noise(seconds: float, sr: int, seed: int, amp: float = 0.3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (amp * rng.standard_normal(int(seconds * sr))).astype(np.float32)


def stereo(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    return np.stack([left, right], axis=1)


def write_png(path: Path, rgb: np.ndarray, mode: str | None = None) -> Path:
    image = Image.fromarray(rgb)
    if mode == "P":  # an adaptive palette keeps the few colours exact (no dithering)
        image = image.quantize(colors=4, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    elif mode is not None:
        image = image.convert(mode)
    image.save(path)
    return path


def hz_to_mel(f: float) -> float:
    return 1127.0 * math.log(1.0 + f / 700.0)


def expected_mel_bin(freq: float, bins: int = 128, sr: int = 16000) -> int:
    """The Kaldi/HTK filter whose centre is nearest ``freq`` (low 20 Hz, high Nyquist)."""
    low, high = hz_to_mel(20.0), hz_to_mel(sr / 2)
    step = (high - low) / (bins + 1)
    centres = [low + (i + 1) * step for i in range(bins)]
    return int(np.argmin([abs(c - hz_to_mel(freq)) for c in centres]))


# --- audio -------------------------------------------------------------------------------------


def test_formats_and_rates_give_the_ast_shape(tmp_path: Path) -> None:
    left, right = tone(440, 1.0, 44100), noise(1.0, 44100, 1)
    sf.write(tmp_path / "a_stereo.wav", stereo(left, right), 44100)
    sf.write(tmp_path / "b_stereo.flac", stereo(left, right), 44100)
    ogg = stereo(tone(300, 1.0, 48000), tone(900, 1.0, 48000))
    sf.write(tmp_path / "c.ogg", ogg, 48000, format="OGG", subtype="VORBIS")
    sf.write(tmp_path / "d_mono.wav", tone(1000, 1.0, 8000), 8000)
    (tmp_path / "notes.txt").write_text("ignored")

    probe = load_probe(tmp_path, "audio")

    assert probe.tensor.shape == (4, 1, 1024, 128)
    assert probe.tensor.dtype == torch.float32
    assert torch.isfinite(probe.tensor).all()
    assert probe.modality == "audio"
    assert [Path(s).name for s in probe.sources] == [
        "a_stereo.wav",
        "b_stereo.flac",
        "c.ogg",
        "d_mono.wav",
    ]
    assert probe.skipped == []
    # WAV and FLAC of the same signal agree (libsndfile rounds to 16 bits ±1 LSB differently).
    torch.testing.assert_close(probe.tensor[0], probe.tensor[1], atol=1e-3, rtol=0)


@pytest.mark.parametrize("freq", [250.0, 440.0, 1000.0, 3000.0])
def test_tone_energy_peaks_in_its_htk_mel_bin(freq: float) -> None:
    feats = audio_features(torch.from_numpy(tone(freq, 0.6, 16000)), 16000, SMALL)
    assert int(feats[:50].mean(dim=0).argmax()) == expected_mel_bin(freq)


def test_resampling_matches_a_native_16k_recording() -> None:
    def mix(sr: int) -> torch.Tensor:
        return torch.from_numpy(tone(440, 0.8, sr, 0.3) + tone(2500, 0.8, sr, 0.2))

    native = audio_features(mix(16000), 16000, SMALL)
    for sr in (8000, 22050, 44100, 48000):
        resampled = audio_features(mix(sr), sr, SMALL)
        strong = native.mean(dim=0) > native.mean(dim=0).max() - 8.0  # within ~35 dB of peak
        assert (resampled - native)[:, strong].abs().max() < 0.05, sr


def test_channels_are_averaged_and_silence_stays_finite(tmp_path: Path) -> None:
    sig = tone(700, 0.5, 16000)
    sf.write(tmp_path / "opposite.wav", stereo(sig, -sig), 16000, subtype="FLOAT")
    sf.write(tmp_path / "zeros.wav", np.zeros(8000, np.float32), 16000)

    feats = audio_features(torch.from_numpy(stereo(sig, -sig).T.copy()), 16000, SMALL)
    real_frames = 1 + (8000 - 400) // 160
    torch.testing.assert_close(feats[:real_frames], torch.full((real_frames, 128), LOG_EPS))
    assert torch.all(feats[real_frames:] == 0)

    probe = load_probe(tmp_path, "audio", audio=SMALL)
    assert probe.tensor.shape == (2, 1, 64, 128)
    assert torch.isfinite(probe.tensor).all()


def test_probe_statistics_normalise_real_frames_to_mean_0_std_half(tmp_path: Path) -> None:
    lengths = [0.3, 0.5, 1.0]  # frames 28, 48, 98 -> two clips padded to 64, one cropped
    for i, seconds in enumerate(lengths):
        sig = noise(seconds, 16000, i, amp=0.05 * (i + 1)) + tone(300 * (i + 1), seconds, 16000)
        sf.write(tmp_path / f"{i}.wav", sig, 16000, subtype="FLOAT")

    probe = load_probe(tmp_path, "audio", audio=SMALL)

    real = [1 + (int(s * 16000) - 400) // 160 for s in lengths]
    real = [min(n, 64) for n in real]
    assert real == [28, 48, 64]
    values = torch.cat([probe.tensor[i, 0, :n] for i, n in enumerate(real)]).double()
    assert values.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert values.std(unbiased=False).item() == pytest.approx(0.5, abs=1e-5)

    waves = [torch.from_numpy(sf.read(tmp_path / f"{i}.wav", dtype="float32")[0]) for i in range(3)]
    raw = torch.stack([audio_features(w, 16000, SMALL) for w in waves])
    raw_real = torch.cat([raw[i, :n] for i, n in enumerate(real)]).double()
    mean, std = raw_real.mean().item(), raw_real.std(unbiased=False).item()
    # Padding is 0 in the log-mel domain, normalised like everything else (AST).
    padded = probe.tensor[0, 0, 28:]
    torch.testing.assert_close(padded, torch.full_like(padded, -mean / (2 * std)))
    torch.testing.assert_close(probe.tensor[:, 0], ((raw - mean) / (2 * std)).float())


def test_explicit_mean_and_std_are_used_as_given(tmp_path: Path) -> None:
    sig = tone(500, 0.7, 16000) + noise(0.7, 16000, 3, 0.01)
    sf.write(tmp_path / "x.wav", sig, 16000, subtype="FLOAT")
    opts = AudioOptions(target_frames=64, mean=-4.2677393, std=4.5689974)

    probe = load_probe(tmp_path / "x.wav", "audio", audio=opts)

    raw = audio_features(torch.from_numpy(sig), 16000, opts)
    torch.testing.assert_close(probe.tensor[0, 0], (raw + 4.2677393) / (2 * 4.5689974))


def test_features_are_cropped_and_padded_to_target_frames() -> None:
    sig = torch.from_numpy(noise(2.0, 16000, 4) + tone(800, 2.0, 16000))
    long = audio_features(sig, 16000, AudioOptions(target_frames=300))
    assert long.shape == (300, 128)
    cropped = audio_features(sig, 16000, AudioOptions(target_frames=40))
    torch.testing.assert_close(cropped, long[:40], atol=0, rtol=0)

    short = audio_features(sig[:4800], 16000, AudioOptions(target_frames=40))
    assert short.shape == (40, 128)
    torch.testing.assert_close(short[:28], long[:28], atol=0, rtol=0)
    assert torch.all(short[28:] == 0)


def test_a_long_file_is_read_only_as_far_as_needed(tmp_path: Path) -> None:
    sr = 44100
    sig = noise(20.0, sr, 5) + tone(1500, 20.0, sr, 0.2)
    sf.write(tmp_path / "long.wav", sig, sr, subtype="FLOAT")
    opts = AudioOptions(target_frames=100, mean=0.0, std=0.5)

    probe = load_probe(tmp_path / "long.wav", "audio", audio=opts)

    from_full_file = audio_features(torch.from_numpy(sig), sr, opts)
    torch.testing.assert_close(probe.tensor[0, 0], from_full_file, atol=1e-4, rtol=0)


def test_a_clip_shorter_than_one_window_is_skipped(tmp_path: Path) -> None:
    sf.write(tmp_path / "a.wav", tone(440, 0.5, 16000), 16000)
    sf.write(tmp_path / "b_blip.wav", tone(440, 0.01, 16000), 16000)
    sf.write(tmp_path / "c.wav", tone(660, 0.5, 16000), 16000)

    probe = load_probe(tmp_path, "audio", audio=SMALL)

    assert [Path(s).name for s in probe.sources] == ["a.wav", "c.wav"]
    assert len(probe.skipped) == 1
    file, reason = probe.skipped[0]
    assert file.endswith("b_blip.wav")
    assert "shorter than one 25 ms analysis window" in reason

    with pytest.raises(BnfixError, match="analysis window"):
        load_probe(tmp_path / "b_blip.wav", "audio", audio=SMALL)


@pytest.mark.parametrize("mode", ["fbank", "waveform"])
@pytest.mark.parametrize("rate", [16000, 44100])
def test_a_recording_with_no_samples_or_a_blip_is_skipped_in_both_modes(
    tmp_path: Path, mode: str, rate: int
) -> None:
    """A header-only WAV (an aborted recording): at 44.1 kHz torchaudio's resampler failed
    with a traceback that ended the scan; at 16 kHz waveform mode padded it, like a 1-sample
    blip, into a second of silence that the statistics then averaged in."""
    sf.write(tmp_path / "a.wav", tone(440, 0.5, rate), rate)
    sf.write(tmp_path / "b_empty.wav", np.zeros((0, 1)), rate, subtype="PCM_16")
    sf.write(tmp_path / "c_blip.wav", tone(440, 0.004, rate), rate)
    opts = AudioOptions(input=mode, target_frames=32, num_mel_bins=16, seconds=0.5)

    probe = load_probe(tmp_path, "audio", audio=opts)

    assert [Path(s).name for s in probe.sources] == ["a.wav"]
    reasons = {Path(f).name: r for f, r in probe.skipped}
    assert reasons["b_empty.wav"] == "no audio samples (an empty or aborted recording?)"
    assert "clip is 4.0 ms long, shorter than" in reasons["c_blip.wav"]
    with pytest.raises(BnfixError, match="no audio samples"):
        load_probe(tmp_path / "b_empty.wav", "audio", audio=opts)


def test_corrupt_files_are_skipped_and_reported(tmp_path: Path) -> None:
    sf.write(tmp_path / "a_good.wav", tone(440, 0.5, 16000), 16000)
    (tmp_path / "b_text.wav").write_text("this is not a RIFF file")
    (tmp_path / "c_empty.flac").write_bytes(b"")
    good = (tmp_path / "a_good.wav").read_bytes()
    (tmp_path / "d_truncated.wav").write_bytes(good[:30])
    sf.write(tmp_path / "e_good.ogg", tone(880, 0.5, 16000), 16000, format="OGG")

    probe = load_probe(tmp_path, "audio", audio=SMALL)

    assert probe.tensor.shape[0] == 2
    assert [Path(s).name for s in probe.sources] == ["a_good.wav", "e_good.ogg"]
    assert [Path(f).name for f, _ in probe.skipped] == [
        "b_text.wav",
        "c_empty.flac",
        "d_truncated.wav",
    ]
    for _, reason in probe.skipped:
        assert reason.startswith("cannot decode audio:")
        assert "\n" not in reason


def test_only_corrupt_files_is_an_error_naming_the_first(tmp_path: Path) -> None:
    (tmp_path / "a.wav").write_text("nope")
    (tmp_path / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")

    with pytest.raises(BnfixError) as audio_err:
        load_probe(tmp_path, "audio")
    message = str(audio_err.value)
    assert "no readable audio sample (1 file skipped; first:" in message
    assert "a.wav: cannot decode audio" in message
    assert "\n" not in message
    assert audio_err.value.path == str(tmp_path)

    with pytest.raises(BnfixError, match="no readable image sample"):
        load_probe(tmp_path, "visual")


def test_limit_draws_files_and_keeps_them_in_sorted_order(tmp_path: Path) -> None:
    for name in ["c", "a", "e", "b", "d"]:
        sf.write(tmp_path / f"{name}.wav", tone(200 + ord(name), 0.5, 16000), 16000)
    (tmp_path / "z").mkdir()
    sf.write(tmp_path / "z" / "0.wav", tone(300, 0.5, 16000), 16000)

    probe = load_probe(tmp_path, "audio", limit=2, audio=SMALL)
    assert len(probe.sources) == 2 and probe.sources == sorted(probe.sources)
    assert probe.tensor.shape[0] == 2 and probe.files == 6
    again = load_probe(tmp_path, "audio", limit=2, audio=SMALL)
    assert again.sources == probe.sources and torch.equal(again.tensor, probe.tensor)

    everything = load_probe(tmp_path, "audio", audio=SMALL)
    assert [Path(s).relative_to(tmp_path).as_posix() for s in everything.sources] == [
        "a.wav",
        "b.wav",
        "c.wav",
        "d.wav",
        "e.wav",
        "z/0.wav",
    ]
    with pytest.raises(BnfixError, match="at least 1"):
        load_probe(tmp_path, "audio", limit=0)


def test_hidden_files_are_ignored(tmp_path: Path) -> None:
    sf.write(tmp_path / "a.wav", tone(440, 0.5, 16000), 16000)
    (tmp_path / "._a.wav").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (tmp_path / ".cache").mkdir()
    sf.write(tmp_path / ".cache" / "b.wav", tone(440, 0.5, 16000), 16000)

    probe = load_probe(tmp_path, None, audio=SMALL)

    assert [Path(s).name for s in probe.sources] == ["a.wav"]
    assert probe.skipped == []


# --- images ------------------------------------------------------------------------------------


def normalised(rgb: tuple[int, int, int]) -> torch.Tensor:
    return torch.tensor(
        [(v / 255 - m) / s for v, m, s in zip(rgb, IMAGENET_MEAN, IMAGENET_STD, strict=True)]
    )


def test_images_are_resized_centre_cropped_and_normalised(tmp_path: Path) -> None:
    colour = (200, 100, 50)
    pixels = np.zeros((480, 640, 3), np.uint8)
    pixels[:] = colour
    pixels[:10] = pixels[-10:] = (255, 0, 0)  # removed by the centre crop
    write_png(tmp_path / "a_colour.png", pixels)
    grey = np.full((300, 200, 3), 90, np.uint8)
    Image.fromarray(grey).convert("L").save(tmp_path / "b_grey.jpg", quality=95)
    write_png(tmp_path / "c_palette.png", pixels, mode="P")
    write_png(tmp_path / "d_rgba.png", pixels, mode="RGBA")
    Image.fromarray(pixels).save(tmp_path / "e.bmp")
    Image.fromarray(pixels).save(tmp_path / "f.webp", lossless=True)

    probe = load_probe(tmp_path, "visual")

    assert probe.tensor.shape == (6, 3, 224, 224)
    assert probe.modality == "visual"
    expected = normalised(colour)[:, None, None].expand(3, 224, 224)
    one_level = 1 / 255 / min(IMAGENET_STD) + 1e-6
    for i in (0, 2, 3, 4, 5):
        torch.testing.assert_close(probe.tensor[i], expected, atol=one_level, rtol=0)
    torch.testing.assert_close(probe.tensor[0, :, 112, 112], normalised(colour))
    # A greyscale JPEG becomes three equal channels.
    torch.testing.assert_close(
        probe.tensor[1] * torch.tensor(IMAGENET_STD)[:, None, None]
        + torch.tensor(IMAGENET_MEAN)[:, None, None],
        torch.full((3, 224, 224), 90 / 255),
        atol=2 / 255,
        rtol=0,
    )


def test_image_options_change_the_transform(tmp_path: Path) -> None:
    write_png(tmp_path / "x.png", np.full((50, 80, 3), 255, np.uint8))
    opts = ImageOptions(size=32, resize=40, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))

    probe = load_probe(tmp_path / "x.png", None, image=opts)

    assert probe.tensor.shape == (1, 3, 32, 32)
    torch.testing.assert_close(probe.tensor, torch.ones(1, 3, 32, 32))


def test_corrupt_image_is_skipped(tmp_path: Path) -> None:
    write_png(tmp_path / "a.png", np.zeros((64, 64, 3), np.uint8))
    (tmp_path / "b.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "c.png").write_bytes(data[: len(data) // 2])

    probe = load_probe(tmp_path, "visual")

    assert probe.tensor.shape == (1, 3, 224, 224)
    assert [Path(f).name for f, _ in probe.skipped] == ["b.jpg", "c.png"]
    assert all(reason.startswith("cannot decode image:") for _, reason in probe.skipped)


# --- ready tensors -----------------------------------------------------------------------------


class NotATensor:
    pass


def test_ready_tensors_round_trip_exactly(tmp_path: Path) -> None:
    x = torch.randn(5, 3, 8, 8)
    torch.save(x.clone().requires_grad_(), tmp_path / "bare.pt")
    torch.save({"probe": x, "labels": torch.arange(5)}, tmp_path / "keyed.pth")
    torch.save({"whatever": x}, tmp_path / "single.pt")
    np.save(tmp_path / "x.npy", x.numpy())
    save_file({"probe": x, "other": torch.zeros(2)}, tmp_path / "x.safetensors")
    save_file({"only": x}, tmp_path / "only.safetensors")

    for name in ["bare.pt", "keyed.pth", "single.pt", "x.npy", "x.safetensors", "only.safetensors"]:
        probe = load_probe(tmp_path / name, None)
        assert torch.equal(probe.tensor, x), name
        assert probe.tensor.dtype == torch.float32
        assert not probe.tensor.requires_grad
        assert probe.modality is None
        assert probe.sources == [str(tmp_path / name)] * 5


def test_ready_tensor_without_channels_gets_one(tmp_path: Path) -> None:
    x = torch.randn(4, 16, 12, dtype=torch.float64)
    np.save(tmp_path / "spec.npy", x.numpy().astype(">f8"))  # big-endian float64

    probe = load_probe(tmp_path / "spec.npy", "audio")

    assert probe.tensor.shape == (4, 1, 16, 12)
    assert probe.modality == "audio"
    torch.testing.assert_close(probe.tensor[:, 0], x.float(), atol=0, rtol=0)


def test_a_folder_of_ready_tensors_is_concatenated(tmp_path: Path) -> None:
    a, b = torch.randn(3, 1, 4, 4), torch.randn(2, 1, 4, 4)
    torch.save(a, tmp_path / "1.pt")
    np.save(tmp_path / "2.npy", b.numpy())
    torch.save(NotATensor(), tmp_path / "3_pickled.pt")

    probe = load_probe(tmp_path, None)
    assert torch.equal(probe.tensor, torch.cat([a, b]))
    assert [Path(s).name for s in probe.sources] == ["1.pt"] * 3 + ["2.npy"] * 2
    assert len(probe.skipped) == 1
    assert "weights_only" in probe.skipped[0][1]

    limited = load_probe(tmp_path, None, limit=4)  # 4 of the 5 rows, drawn, in file order
    rows = [
        i for i in range(5) if any(torch.equal(torch.cat([a, b])[i], x) for x in limited.tensor)
    ]
    assert len(rows) == 4 and torch.equal(limited.tensor, torch.cat([a, b])[rows])
    assert len(limited.sources) == 4

    torch.save(torch.randn(2, 3, 4, 4), tmp_path / "4.pt")
    with pytest.raises(BnfixError, match="disagree in shape"):
        load_probe(tmp_path, None)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (torch.arange(8).reshape(2, 1, 2, 2), "int64"),
        (torch.randn(2, 2), "expected [N, C, H, W]"),
        ({"a": torch.randn(2, 1, 2, 2), "b": torch.randn(2, 1, 2, 2)}, "none is named probe"),
        ([torch.randn(2, 1, 2, 2)], "holds a list"),
        (torch.tensor([[[[float("nan")]]]]), "NaN"),
    ],
)
def test_unusable_ready_tensors_say_why(tmp_path: Path, content: object, reason: str) -> None:
    torch.save(content, tmp_path / "p.pt")
    with pytest.raises(BnfixError, match=reason.replace("[", r"\[")) as err:
        load_probe(tmp_path / "p.pt", None)
    assert "\n" not in str(err.value)


# --- choosing what to read ---------------------------------------------------------------------


def test_path_errors(tmp_path: Path) -> None:
    with pytest.raises(BnfixError, match="does not exist"):
        load_probe(tmp_path / "missing", "audio")

    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(BnfixError, match=r"looked for \.wav, \.flac, \.ogg"):
        load_probe(tmp_path, "audio")
    with pytest.raises(BnfixError, match=r"unsupported probe file type '\.txt'"):
        load_probe(tmp_path / "readme.txt", None)

    sf.write(tmp_path / "a.wav", tone(440, 0.5, 16000), 16000)
    with pytest.raises(BnfixError, match="audio file but the modality is visual"):
        load_probe(tmp_path / "a.wav", "visual")
    with pytest.raises(BnfixError, match=r"looked for \.jpg"):
        load_probe(tmp_path, "visual")

    write_png(tmp_path / "b.png", np.zeros((8, 8, 3), np.uint8))
    write_png(tmp_path / "c.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(BnfixError, match="mixes 1 audio file and 2 image files; pass a modality"):
        load_probe(tmp_path, None)
    assert load_probe(tmp_path, "audio", audio=SMALL).sources == [str(tmp_path / "a.wav")]
    assert load_probe(tmp_path, "visual").sources == [str(tmp_path / n) for n in ("b.png", "c.png")]

    with pytest.raises(BnfixError, match="unknown modality 'video'"):
        load_probe(tmp_path, "video")


def test_modality_prefers_its_own_files_then_ready_tensors(tmp_path: Path) -> None:
    torch.save(torch.randn(2, 1, 8, 8), tmp_path / "ready.pt")
    assert load_probe(tmp_path, "audio").tensor.shape == (2, 1, 8, 8)
    sf.write(tmp_path / "a.wav", tone(440, 0.5, 16000), 16000)
    assert load_probe(tmp_path, "audio", audio=SMALL).tensor.shape == (1, 1, 64, 128)


def test_bad_options_are_refused() -> None:
    with pytest.raises(BnfixError, match="std must be a positive"):
        AudioOptions(std=0.0)
    with pytest.raises(BnfixError, match="num_mel_bins"):
        AudioOptions(num_mel_bins=2)
    with pytest.raises(BnfixError, match="image std"):
        ImageOptions(std=(0.2, 0.0, 0.2))


# --- adapting and batching ---------------------------------------------------------------------


def test_adapt_channels_matches_the_stem_arithmetic() -> None:
    torch.manual_seed(0)
    spectrogram = torch.randn(4, 1, 20, 16)
    rgb_stem = torch.randn(8, 3, 3, 3)
    repeated = adapt_channels(spectrogram, 3)
    assert repeated.shape == (4, 3, 20, 16)
    assert torch.equal(repeated[:, 0], repeated[:, 2])
    torch.testing.assert_close(
        F.conv2d(repeated, rgb_stem), F.conv2d(spectrogram, rgb_stem.sum(1, keepdim=True))
    )

    images = torch.randn(4, 3, 20, 16)
    mono_stem = torch.randn(8, 1, 3, 3)
    averaged = adapt_channels(images, 1)
    assert averaged.shape == (4, 1, 20, 16)
    torch.testing.assert_close(
        F.conv2d(averaged, mono_stem), F.conv2d(images, mono_stem.repeat(1, 3, 1, 1) / 3)
    )

    assert adapt_channels(images, 3) is images
    with pytest.raises(BnfixError, match="probe has 2 channels but the model's stem takes 3"):
        adapt_channels(torch.randn(2, 2, 4, 4), 3, "p.pt")


def test_batches_cover_everything_in_order_and_never_hold_one_sample() -> None:
    for n in range(2, 30):
        x = torch.arange(n).float()
        for size in range(2, 9):
            parts = batches(x, size)
            assert torch.equal(torch.cat(parts), x)
            assert all(2 <= len(p) <= size + 1 for p in parts), (n, size)
            assert all(len(p) == size for p in parts[:-1])
    assert [len(p) for p in batches(torch.zeros(9), 4)] == [4, 5]
    with pytest.raises(BnfixError, match="at least 2"):
        batches(torch.zeros(1, 3), 4)
    with pytest.raises(BnfixError, match="batch size must be at least 2"):
        batches(torch.zeros(8), 1)


# --- demo probe --------------------------------------------------------------------------------


def test_demo_audio_is_realistic_and_deterministic(tmp_path: Path) -> None:
    files = write_demo_audio(tmp_path / "a", n=3, seed=7)
    again = write_demo_audio(tmp_path / "b", n=3, seed=7)
    other = write_demo_audio(tmp_path / "c", n=1, seed=8)

    assert [f.name for f in files] == ["demo_000.wav", "demo_001.wav", "demo_002.wav"]
    assert [f.read_bytes() for f in files] == [f.read_bytes() for f in again]
    assert other[0].read_bytes() != files[0].read_bytes()
    for f in files:
        info = sf.info(str(f))
        assert (info.samplerate, info.channels, info.subtype) == (44100, 2, "PCM_16")
        assert 3.0 <= info.duration <= 6.0
        data, _ = sf.read(f)
        assert 0.3 <= np.abs(data).max() <= 0.9 + 1e-4
        assert not np.allclose(data[:, 0], data[:, 1])  # really stereo

    probe = load_probe(tmp_path / "a", "audio", audio=AudioOptions(target_frames=300))
    assert probe.tensor.shape == (3, 1, 300, 128)
    assert torch.isfinite(probe.tensor).all()
    # Energy is spread over the spectrum: every mel bin varies, except bin 3, whose Kaldi
    # filter is narrower than the 31.25 Hz FFT spacing and catches no FFT bin at all.
    varies = probe.tensor.amax(dim=(0, 1, 2)) > probe.tensor.amin()
    assert varies.logical_not().nonzero().flatten().tolist() == [3]


def test_probe_is_a_plain_dataclass() -> None:
    probe = Probe(tensor=torch.zeros(2, 1, 2, 2), modality=None, sources=["x", "x"], skipped=[])
    assert pickle.loads(pickle.dumps(probe)).sources == ["x", "x"]


# --- entries that are not regular files --------------------------------------------------------


def _within(seconds: float, call):
    """``call()``'s result, failing (not hanging the suite) if it blocks: opening a FIFO with no
    writer never returns, so the call runs in a daemon thread that is abandoned on a timeout."""
    import threading

    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["result"] = call()
        except BaseException as e:  # re-raised in the test's thread
            box["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"blocked for {seconds} s: a FIFO was opened"
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["result"]


@pytest.mark.parametrize("kind", ["image", "audio", "tensor", "clip"])
def test_fifos_and_broken_links_are_skipped_unopened(tmp_path: Path, kind: str) -> None:
    from bnfix.probe import ClipOptions

    ext = {"image": ".png", "audio": ".wav", "tensor": ".pt", "clip": ".png"}[kind]
    root = tmp_path / "probe"
    folder = root / "clip0" if kind == "clip" else root
    folder.mkdir(parents=True)
    for i in range(2):
        if kind == "audio":
            sf.write(folder / f"{i}.wav", tone(440, 0.5, 16000), 16000)
        elif kind == "tensor":
            torch.save(torch.randn(2, 1, 4, 4), folder / f"{i}.pt")
        else:
            write_png(folder / f"{i}.png", np.full((8, 8, 3), 40 * i, np.uint8))
    os.mkfifo(folder / f"f{ext}")
    (folder / f"g{ext}").symlink_to(folder / f"missing{ext}")
    (folder / f"l{ext}").symlink_to(folder / f"0{ext}")  # a link to a regular file is read
    if kind == "clip":  # a second clip, so the clip probe has two samples
        (root / "clip1").mkdir()
        write_png(root / "clip1" / "0.png", np.zeros((8, 8, 3), np.uint8))
    modality = {"image": "visual", "audio": "audio", "tensor": None, "clip": "visual"}[kind]
    clip = ClipOptions(frames=2, size=8, resize=(8, 8)) if kind == "clip" else None

    probe = _within(20, lambda: load_probe(root, modality, audio=SMALL, clip=clip))

    assert probe.skipped == [
        (str(folder / f"f{ext}"), "not a regular file (a FIFO)"),
        (str(folder / f"g{ext}"), "a broken symbolic link"),
    ]
    if kind == "clip":
        assert probe.sources == [str(root / "clip0"), str(root / "clip1")]
    else:
        names = ["0", "1", "l"]
        assert sorted({Path(s).name for s in probe.sources}) == [n + ext for n in names]
        assert probe.files == 3


def test_a_probe_of_only_unreadable_entries_is_an_error(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "f.png")
    with pytest.raises(BnfixError) as err:
        _within(20, lambda: load_probe(tmp_path, "visual"))
    assert "no readable image sample (1 file skipped; first:" in str(err.value)
    assert "f.png: not a regular file (a FIFO)" in str(err.value)


def test_a_fifo_or_device_given_as_the_probe_is_one_clear_error(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "f.png")
    targets = [(tmp_path / "f.png", "a FIFO")]
    if Path("/dev/zero").exists():
        targets.append((Path("/dev/zero"), "a character device"))
    for path, what in targets:
        for modality in ("visual", "audio", None):
            with pytest.raises(BnfixError) as err:
                _within(20, lambda p=path, m=modality: load_probe(p, m))
            message = str(err.value)
            assert f"cannot read this probe: not a regular file ({what})" in message
            assert "\n" not in message
