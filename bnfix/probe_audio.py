"""Audio probe features: the AST-style Kaldi log-mel front end, plus a synthetic demo probe.

The defaults reproduce the input pipeline of AudioSet/VGGSound CNNs and the Audio Spectrogram
Transformer (16 kHz mono, 128-bin Kaldi fbank, 25 ms Hanning window, 10 ms shift, 1024 frames,
``(x - mean) / (2 * std)``), because a dead-channel scan is only meaningful on inputs that look
like what the checkpoint was trained or will be fine-tuned on.

Decoding goes through ``soundfile`` (libsndfile) for WAV/FLAC/OGG and PyAV (FFmpeg) for
compressed audio and video containers (:mod:`bnfix.media`): ``torchaudio.load`` in torchaudio
>= 2.9 needs torchcodec, which a plain install does not have.

Readers raise :class:`~bnfix.errors.BnfixError` without a path for a file that cannot be used;
:func:`bnfix.probe.load_probe` turns those into ``skipped`` entries.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from bnfix.errors import BnfixError
from bnfix.media.audio import read_audio as _decode_audio

# torchaudio's resampler looks at most ~6.1 x (rate ratio) + 1 input samples beyond an output
# sample (lowpass_filter_width=6, rolloff=0.99); this margin is comfortably wider, so reading a
# prefix of a long file gives the same features as reading all of it.
_RESAMPLE_MARGIN_FACTOR = 16
_RESAMPLE_MARGIN_EXTRA = 16


AUDIO_INPUTS = ("fbank", "waveform")


@dataclass(frozen=True)
class AudioOptions:
    """Parameters of the audio front end; the defaults are AST's (see DESIGN.md, Probe data).

    Clips shorter than ``target_frames`` are padded with zeros in the log-mel domain before
    normalisation (as AST does), so padded rows read ``-mean / (2 std)`` in the probe.
    """

    sample_rate: int = 16000
    num_mel_bins: int = 128
    target_frames: int = 1024
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    mean: float | None = None  # None: computed over the probe's own (unpadded) frames
    std: float | None = None  # None: likewise
    input: str = "fbank"  # "fbank": [1, frames, mel bins]; "waveform": [1, samples] (1-D models)
    seconds: float = 1.0  # waveform input: every clip zero-padded or cropped to this length

    def __post_init__(self) -> None:
        # Checked here so that a bad CLI value fails before any file is decoded, and in words
        # rather than as one of kaldi.fbank's bare assertions.
        if self.sample_rate <= 0:
            raise BnfixError(f"audio sample_rate must be positive (got {self.sample_rate})")
        if self.num_mel_bins < 4:
            raise BnfixError(f"num_mel_bins must be at least 4 (got {self.num_mel_bins})")
        if self.target_frames < 1:
            raise BnfixError(f"target_frames must be at least 1 (got {self.target_frames})")
        if self.window_samples < 2:
            raise BnfixError(
                f"frame_length_ms={self.frame_length_ms:g} is under 2 samples at "
                f"{self.sample_rate} Hz; use a longer frame"
            )
        if self.shift_samples < 1:
            raise BnfixError(
                f"frame_shift_ms={self.frame_shift_ms:g} is under 1 sample at "
                f"{self.sample_rate} Hz; use a longer shift"
            )
        if self.mean is not None and not math.isfinite(self.mean):
            raise BnfixError(f"audio mean must be a finite number (got {self.mean})")
        if self.std is not None and not (math.isfinite(self.std) and self.std > 0):
            raise BnfixError(f"audio std must be a positive number (got {self.std})")
        if self.input not in AUDIO_INPUTS:
            raise BnfixError(
                f"audio input must be one of {', '.join(AUDIO_INPUTS)}, not {self.input!r}"
            )
        if not (math.isfinite(self.seconds) and self.seconds > 0):
            raise BnfixError(f"--seconds must be a positive number (got {self.seconds})")

    @property
    def window_samples(self) -> int:
        """Analysis window in samples, rounded exactly as kaldi.fbank rounds it."""
        return int(self.sample_rate * self.frame_length_ms * 0.001)

    @property
    def shift_samples(self) -> int:
        """Frame shift in samples, rounded exactly as kaldi.fbank rounds it."""
        return int(self.sample_rate * self.frame_shift_ms * 0.001)

    @property
    def samples_needed(self) -> int:
        """Samples at ``sample_rate`` that yield exactly ``target_frames`` frames.

        kaldi.fbank (snip_edges=True) frames are independent of what follows them, so anything
        past this point would only be cropped away again. A waveform input needs ``seconds``.
        """
        if self.input == "waveform":
            return max(1, round(self.seconds * self.sample_rate))
        return (self.target_frames - 1) * self.shift_samples + self.window_samples


def source_samples_needed(sample_rate: int, opts: AudioOptions) -> int:
    """Samples at the file's own rate to read so that the resampled prefix is exact."""
    ratio = sample_rate / opts.sample_rate
    margin = math.ceil(_RESAMPLE_MARGIN_FACTOR * max(ratio, 1.0)) + _RESAMPLE_MARGIN_EXTRA
    return math.ceil(opts.samples_needed * ratio) + margin


def read_audio(path: Path, opts: AudioOptions) -> tuple[torch.Tensor, int]:
    """Decode the part of ``path`` that the features use, as ``[channels, time]`` float32.

    Only a prefix is read: a one-hour recording costs no more than a 10 s clip. WAV/FLAC/OGG
    through libsndfile, anything else (MP3, AAC, Opus, a video's audio track) through PyAV:
    see :func:`bnfix.media.read_audio`, which this is.
    """
    return _decode_audio(path, opts)


def _mono_at_rate(waveform: torch.Tensor, sample_rate: int, opts: AudioOptions) -> torch.Tensor:
    """The mono mix at ``opts.sample_rate``, cut to what the features use. An empty track is
    refused before the resampler, which fails on it with a reshape error."""
    mono = mono_mix(waveform)[: source_samples_needed(sample_rate, opts)]
    if mono.numel() == 0:
        raise BnfixError("no audio samples (an empty or aborted recording?)")
    if sample_rate != opts.sample_rate:
        mono = _resampler(int(sample_rate), opts.sample_rate)(mono)
    return mono[: opts.samples_needed]


def waveform_features(waveform: torch.Tensor, sample_rate: int, opts: AudioOptions) -> torch.Tensor:
    """``[1, samples]``: mono, resampled to ``opts.sample_rate``, zero-padded or cropped to
    ``opts.seconds`` — the raw input a 1-D (waveform) CNN takes, not normalised."""
    mono = _mono_at_rate(waveform, sample_rate, opts)
    if mono.numel() < opts.window_samples:
        raise BnfixError(
            f"clip is {mono.numel() / opts.sample_rate * 1000:.1f} ms long, shorter than "
            f"{opts.frame_length_ms:g} ms: padded to {opts.seconds:g} s it would be silence"
        )
    if mono.numel() < opts.samples_needed:
        mono = torch.nn.functional.pad(mono, (0, opts.samples_needed - mono.numel()))
    return mono[None].contiguous()


def audio_features(
    waveform: torch.Tensor, sample_rate: int, opts: AudioOptions = AudioOptions()
) -> torch.Tensor:
    """Log-mel ``[target_frames, num_mel_bins]`` of a ``[time]`` or ``[channels, time]`` wave.

    Not yet normalised: the normalisation statistics belong to the whole probe. Frames past the
    end of a short clip are zeros in the log-mel domain (AST pads before normalising).
    """
    return features_with_length(waveform, sample_rate, opts)[0]


def features_with_length(
    waveform: torch.Tensor, sample_rate: int, opts: AudioOptions
) -> tuple[torch.Tensor, int]:
    """:func:`audio_features` plus the number of real (unpadded) frames, for the statistics."""
    mono = _mono_at_rate(waveform, sample_rate, opts)
    if mono.numel() < opts.window_samples:
        seconds = mono.numel() / opts.sample_rate
        raise BnfixError(
            f"clip is {seconds * 1000:.1f} ms long, shorter than one "
            f"{opts.frame_length_ms:g} ms analysis window"
        )
    from torchaudio.compliance import kaldi  # lazy: torchaudio costs ~0.5 s to import

    fbank = kaldi.fbank(
        mono[None],
        htk_compat=True,
        sample_frequency=opts.sample_rate,
        use_energy=False,
        window_type="hanning",
        num_mel_bins=opts.num_mel_bins,
        dither=0.0,
        frame_shift=opts.frame_shift_ms,
        frame_length=opts.frame_length_ms,
    )
    frames = fbank.shape[0]
    if frames < opts.target_frames:
        fbank = torch.nn.functional.pad(fbank, (0, 0, 0, opts.target_frames - frames))
    return fbank, frames


@functools.lru_cache(maxsize=16)
def _resampler(orig: int, new: int) -> torch.nn.Module:
    """torchaudio's resampler with its sinc kernel built once per rate pair.

    ``torchaudio.functional.resample`` rebuilds the kernel on every call, which costs more than
    resampling a 10 s clip; the module (with the float32 kernel the functional form builds for a
    float32 wave) gives bit-identical output and keeps the kernel.
    """
    import torchaudio.transforms as T

    return T.Resample(orig, new, dtype=torch.float32)


def mono_mix(waveform: torch.Tensor) -> torch.Tensor:
    """Average the channels of a ``[channels, time]`` wave (a ``[time]`` wave is already mono)."""
    if waveform.ndim == 1:
        return waveform.float()
    if waveform.ndim != 2:
        raise BnfixError(
            f"a waveform must be [time] or [channels, time], not {list(waveform.shape)}"
        )
    return waveform.float().mean(dim=0)


def normalise(features: torch.Tensor, frames: list[int], opts: AudioOptions) -> torch.Tensor:
    """``(x - mean) / (2 std)`` on ``[N, T, M]`` features, returned as ``[N, 1, T, M]``.

    Missing statistics are taken over the real frames only, so that padding does not drag the
    mean towards 0; the padded rows (0 in the log-mel domain) become ``-mean / (2 std)``, as in
    AST. An all-silent probe has no spread; it is then divided by 2 x 1 instead of by 0.
    """
    mean, std = opts.mean, opts.std
    if mean is None or std is None:
        probe_mean, probe_std = _real_frame_stats(features, frames)
        mean = probe_mean if mean is None else mean
        std = probe_std if std is None else std
    out = (features - mean) / (2.0 * std)
    return out.unsqueeze(1)


def _real_frame_stats(features: torch.Tensor, frames: list[int]) -> tuple[float, float]:
    """Mean and population std over the unpadded rows, accumulated in float64."""
    total = 0.0
    total_sq = 0.0
    count = 0
    for x, n in zip(features, frames, strict=True):
        real = x[:n].double()
        total += float(real.sum())
        total_sq += float((real * real).sum())
        count += real.numel()
    mean = total / count
    var = max(total_sq / count - mean * mean, 0.0)
    std = math.sqrt(var)
    return mean, (std if std > 1e-6 else 1.0)


# --- synthetic demo probe --------------------------------------------------------------------


def write_demo_audio(
    folder: Path, n: int = 16, sample_rate: int = 44100, seed: int = 0
) -> list[Path]:
    """Write ``n`` stereo 16-bit WAV clips that exercise a spectrogram CNN like real sound.

    Pure tones or white noise would light up a handful of mel bins or none in particular; a mix
    of harmonic tones, chirps, amplitude-modulated noise bursts and clicks over a faint noise
    floor spreads energy over time and frequency the way field recordings do, so the demo scan
    sees realistic activation statistics without shipping audio. Clip ``i`` depends only on
    ``(seed, i)``, so the first clips do not change when ``n`` grows.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        clip = _demo_clip(rng, sample_rate)
        path = folder / f"demo_{i:03d}.wav"
        sf.write(str(path), clip, sample_rate, subtype="PCM_16", format="WAV")
        paths.append(path)
    return paths


def _demo_clip(rng: np.random.Generator, sr: int) -> np.ndarray:
    """One 3-6 s stereo clip ``[time, 2]`` with a peak between 0.3 and 0.9."""
    length = int(rng.uniform(3.0, 6.0) * sr)
    stereo = np.zeros((length, 2))
    makers = (_tone, _chirp, _noise_burst, _clicks)
    for _ in range(int(rng.integers(3, 9))):
        maker = makers[int(rng.integers(len(makers)))]
        start = int(rng.integers(0, length - sr // 4))
        seg_len = min(length - start, int(rng.uniform(0.2, 2.5) * sr))
        seg = maker(rng, seg_len, sr) * 10 ** (rng.uniform(-20, 0) / 20)
        _pan_into(stereo, seg, start, rng)
    stereo += _coloured_noise(rng, length, sr, 60.0, 0.45 * sr)[:, None] * 10 ** (-55 / 20)
    peak = np.abs(stereo).max()
    return stereo * (rng.uniform(0.3, 0.9) / peak)


def _pan_into(stereo: np.ndarray, seg: np.ndarray, start: int, rng: np.random.Generator) -> None:
    """Add ``seg`` with constant-power panning and a small inter-channel delay."""
    pan = rng.uniform(0.0, 1.0)
    delay = int(rng.integers(0, 24))
    end = start + seg.shape[0]
    stereo[start:end, 0] += math.sqrt(1.0 - pan) * seg
    right = seg[: max(seg.shape[0] - delay, 0)]
    stereo[start + delay : start + delay + right.shape[0], 1] += math.sqrt(pan) * right


def _envelope(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    """Attack, then exponential decay: what most natural sound events look like."""
    t = np.arange(n) / sr
    attack = rng.uniform(0.002, 0.08)
    decay = rng.uniform(0.1, 2.0)
    env = np.minimum(t / attack, 1.0) * np.exp(-np.maximum(t - attack, 0.0) / decay)
    fade = min(n, int(0.01 * sr))
    env[n - fade :] *= np.linspace(1.0, 0.0, fade)
    return env


def _tone(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    """A harmonic tone with vibrato and a 1/k^r harmonic roll-off (voice- or instrument-like)."""
    t = np.arange(n) / sr
    f0 = math.exp(rng.uniform(math.log(80.0), math.log(1000.0)))
    inst = f0 * (1.0 + rng.uniform(0.0, 0.02) * np.sin(2 * np.pi * rng.uniform(3, 7) * t))
    phase = 2 * np.pi * np.cumsum(inst) / sr
    rolloff = rng.uniform(0.7, 2.0)
    out = np.zeros(n)
    for k in range(1, int(rng.integers(1, 12)) + 1):
        if k * f0 * 1.02 >= 0.45 * sr:
            break
        out += k**-rolloff * np.sin(k * phase + rng.uniform(0, 2 * np.pi))
    return out * _envelope(rng, n, sr)


def _chirp(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    """An exponential sweep (bird, siren, engine rev) with one or two harmonics."""
    duration = n / sr
    f_a, f_b = np.exp(rng.uniform(math.log(150.0), math.log(min(8000.0, 0.2 * sr)), size=2))
    t = np.arange(n) / sr
    k = math.log(f_b / f_a) / duration
    phase = 2 * np.pi * f_a * (np.expm1(k * t) / k if abs(k) > 1e-9 else t)
    out = np.sin(phase)
    if rng.uniform() < 0.5:
        out += 0.3 * np.sin(2 * phase)
    return out * _envelope(rng, n, sr)


def _noise_burst(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    """Band-limited noise, amplitude-modulated at 2-16 Hz (rain, wind, engines, applause)."""
    centre = math.exp(rng.uniform(math.log(200.0), math.log(min(6000.0, 0.3 * sr))))
    width = rng.uniform(0.5, 2.0)  # octaves
    noise = _coloured_noise(rng, n, sr, centre * 2 ** (-width / 2), centre * 2 ** (width / 2))
    t = np.arange(n) / sr
    depth = rng.uniform(0.3, 1.0)
    am = 1.0 - depth * 0.5 * (1.0 + np.sin(2 * np.pi * rng.uniform(2.0, 16.0) * t))
    return noise * am * _envelope(rng, n, sr)


def _clicks(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    """Sparse short decaying transients (footsteps, knocks, keyboard)."""
    out = np.zeros(n)
    click_len = int(0.02 * sr)
    decay = np.exp(-np.arange(click_len) / (rng.uniform(0.0005, 0.005) * sr))
    for _ in range(int(rng.integers(3, 30))):
        at = int(rng.integers(0, max(n - click_len, 1)))
        burst = rng.standard_normal(click_len) * decay * rng.uniform(0.3, 1.0)
        out[at : at + click_len] += burst[: n - at]
    return out


def _coloured_noise(
    rng: np.random.Generator, n: int, sr: int, low_hz: float, high_hz: float
) -> np.ndarray:
    """Unit-peak noise with a 1/f tilt inside ``[low_hz, high_hz]``, shaped in the FFT domain."""
    size = 1 << max(n - 1, 1).bit_length()  # a power of two: pocketfft is slow on odd sizes
    spectrum = np.fft.rfft(rng.standard_normal(size))
    freqs = np.fft.rfftfreq(size, 1.0 / sr)
    band = (freqs >= low_hz) & (freqs <= high_hz)
    spectrum *= band / np.sqrt(np.maximum(freqs, 1.0))
    out = np.fft.irfft(spectrum, size)[:n]
    peak = np.abs(out).max()
    return out / peak if peak > 0 else out
