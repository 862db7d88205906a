"""Synthetic videos whose every frame says which frame it is: for tests and benchmarks.

A decoded frame is identified without trusting timestamps: the top band of frame ``i`` holds
``i`` in binary as black and white blocks (robust to any codec at any sane quality), and the
rest is a smooth colour gradient whose blue level changes every second (what a codec sees
in real footage: smooth areas, edges, scene changes). :func:`frame_index` reads the number back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bnfix.media.container import av_module

#: Bits of the frame number in the top band (frames 0..255).
BITS = 8
#: Blue level of the gradient in second s: one of these, cycling.
SECOND_BLUES = (40, 200, 120, 240, 80)


def pattern(index: int, fps: float, width: int = 64, height: int = 48) -> np.ndarray:
    """Frame ``index`` of the synthetic video, ``[height, width, 3]`` uint8 RGB.

    ``width`` must be a multiple of 8·2 so the bit blocks sit on the codecs' 8-pixel grid with
    even (chroma-aligned) edges; the band is a quarter of the height, at least 16 rows.
    """
    if width % (2 * BITS) or height < 32:
        raise ValueError(f"width must be a multiple of {2 * BITS} and height at least 32")
    band = _band_rows(height)
    img = np.empty((height, width, 3), np.uint8)
    x = np.linspace(0, 255, width)[None, :]
    y = np.linspace(0, 255, height - band)[:, None]
    img[band:, :, 0] = np.rint(np.broadcast_to(x, (height - band, width)))
    img[band:, :, 1] = np.rint(np.broadcast_to(y, (height - band, width)))
    img[band:, :, 2] = SECOND_BLUES[int(index / fps) % len(SECOND_BLUES)]
    block = width // BITS
    for bit in range(BITS):
        on = (index >> (BITS - 1 - bit)) & 1
        img[:band, bit * block : (bit + 1) * block] = 255 if on else 0
    return img


def frame_index(rgb: np.ndarray) -> int:
    """The frame number a decoded ``[H, W, 3]`` (or ``[3, H, W]``) pattern frame shows."""
    if rgb.shape[0] == 3 and rgb.shape[-1] != 3:
        rgb = np.moveaxis(rgb, 0, -1)
    height, width = rgb.shape[:2]
    band = _band_rows(height)
    block = width // BITS
    grey = rgb[2 : band - 2].astype(np.float64).mean(axis=2)
    value = 0
    for bit in range(BITS):
        cell = grey[:, bit * block + 2 : (bit + 1) * block - 2]
        value = (value << 1) | int(cell.mean() > 127.5)
    return value


def _band_rows(height: int) -> int:
    return max(16, (height // 4) // 2 * 2)


def write_video(
    path: Path,
    seconds: float,
    *,
    fps: int = 25,
    width: int = 64,
    height: int = 48,
    codec: str = "libx264",
    options: Mapping[str, str] | None = None,
    gop: int | None = None,
    bit_rate: int | None = None,
    rotation: int | None = None,
    audio: np.ndarray | None = None,
    audio_rate: int = 48000,
    audio_codec: str | None = None,
    container_options: Mapping[str, str] | None = None,
    texture: float = 0.0,
    timestamps: Sequence[int] | None = None,
) -> int:
    """Encode ``seconds`` of :func:`pattern` frames to ``path``; returns the frame count.

    ``rotation`` is the display matrix's counter-clockwise angle (as ``VideoFrame.rotation``
    reads it back): the frames are stored turned the other way, so a player that honours the
    matrix shows the pattern upright. ``audio`` (``[channels, samples]`` float32 in [-1, 1]) is
    muxed as a second stream with ``audio_codec``. ``texture`` (0..1) adds a moving noise
    texture under the bit band, so that the frames cost what camera footage costs to encode
    and decode (flat gradients are nearly free); :func:`pattern`'s band still reads back.
    ``timestamps`` (in periods of ``1/fps``, increasing) makes a variable-rate video: frame i
    is shown from ``timestamps[i] / fps``; ``seconds`` is then ignored.
    """
    av = av_module()
    count = round(seconds * fps) if timestamps is None else len(timestamps)
    grain = _grain(width, height) if texture > 0 else None
    with av.open(str(path), mode="w", options=dict(container_options or {})) as out:
        video = out.add_stream(codec, rate=fps)
        stored_w, stored_h = (height, width) if rotation in (90, -90, 270) else (width, height)
        video.width, video.height = stored_w, stored_h
        video.pix_fmt = "yuv420p"
        if options:
            video.options = dict(options)
        if gop is not None:
            video.codec_context.gop_size = gop
        if bit_rate is not None:
            video.codec_context.bit_rate = bit_rate
        if rotation:
            video.set_display_rotation(rotation)
        sound = None
        if audio is not None:
            sound = out.add_stream(audio_codec or "aac", rate=audio_rate)
            sound.layout = "stereo" if audio.shape[0] == 2 else "mono"
        for i in range(count):
            img = pattern(i, fps, width, height)
            if grain is not None:
                img = _textured(img, grain, i, texture)
            if rotation:
                img = np.ascontiguousarray(np.rot90(img, k=-round(rotation / 90)))
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = i if timestamps is None else int(timestamps[i])
            out.mux(video.encode(frame))
        out.mux(video.encode())
        if sound is not None and audio is not None:
            _encode_audio(av, out, sound, audio, audio_rate)
    return count


def _grain(width: int, height: int) -> np.ndarray:
    """A fixed, seeded field of smoothed noise in [-1, 1], twice the frame's size."""
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((2 * height, 2 * width))
    smooth = (
        noise + np.roll(noise, 1, 0) + np.roll(noise, 1, 1) + np.roll(noise, (1, 1), (0, 1))
    ) / 4
    return np.clip(smooth / 2.0, -1.0, 1.0)


def _textured(img: np.ndarray, grain: np.ndarray, index: int, amount: float) -> np.ndarray:
    """``img`` with a window of ``grain`` that drifts 2 px right and 1 px down per frame
    added below the bit band (a pan over a textured scene)."""
    height, width = img.shape[:2]
    band = _band_rows(height)
    dy, dx = index % height, (2 * index) % width
    window = grain[dy : dy + height - band, dx : dx + width, None]
    out = img.astype(np.float64)
    out[band:] += amount * 127.5 * window
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _encode_audio(av: Any, out: Any, sound: Any, audio: np.ndarray, rate: int) -> None:
    """Feed the wave in the encoder's frame size (PyAV converts fltp to the codec's format)."""
    step = sound.codec_context.frame_size or 1024
    layout = "stereo" if audio.shape[0] == 2 else "mono"
    wave = np.ascontiguousarray(audio, dtype=np.float32)
    for start in range(0, wave.shape[1], step):
        chunk = np.ascontiguousarray(wave[:, start : start + step])
        frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=layout)
        frame.sample_rate = rate
        frame.pts = start
        out.mux(sound.encode(frame))
    out.mux(sound.encode())


def write_audio(path: Path, wave: np.ndarray, rate: int, codec: str) -> None:
    """Encode ``wave`` (``[channels, samples]`` float32) alone, e.g. an .mp3 or .m4a file."""
    av = av_module()
    with av.open(str(path), mode="w") as out:
        sound = out.add_stream(codec, rate=rate)
        sound.layout = "stereo" if wave.shape[0] == 2 else "mono"
        _encode_audio(av, out, sound, wave, rate)
