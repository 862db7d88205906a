"""Audio decoding: the prefix of a file's (or a video's) audio track that the features use.

libsndfile reads WAV/FLAC/OGG exactly and fast, so those go through ``soundfile`` as before;
everything else (MP3, AAC/M4A, Opus, and the audio track of any video container) and any file
libsndfile refuses goes through PyAV (FFmpeg). Either way the result is ``[channels, time]``
float32 at the file's own rate, and only ``source_samples_needed`` samples are decoded: a one
hour recording costs what a 10 s clip costs. Mono mix, resampling and the fbank stay in
:mod:`bnfix.probe_audio`.

Errors are path-less :class:`~bnfix.errors.BnfixError` with a one-line reason; callers (the
probe, the fusion feature extraction) name the file their way.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from bnfix.errors import BnfixError
from bnfix.media.container import av_module, open_input, reason
from bnfix.media.kinds import SOUNDFILE_EXTENSIONS

if TYPE_CHECKING:
    from bnfix.probe_audio import AudioOptions


def read_audio(path: Path, opts: AudioOptions) -> tuple[torch.Tensor, int]:
    """Decode the part of ``path`` the features use, as ``[channels, time]`` float32 and rate.

    A WAV/FLAC/OGG that libsndfile cannot read is retried with FFmpeg (e.g. Opus in OGG with
    an old libsndfile, or a WAV holding a compressed codec); if FFmpeg gets no sound out of it
    either, libsndfile's reason is the one reported, being about the format the name promises.
    """
    path = Path(path)
    if path.suffix.lower() in SOUNDFILE_EXTENSIONS:
        try:
            wave, rate = _read_soundfile(path, opts)
        except _DecodeError as first:
            try:
                wave, rate = _read_pyav(path, opts)
            except BnfixError:
                raise BnfixError(f"cannot decode audio: {first.reason}") from first
            if wave.shape[-1] == 0:
                raise BnfixError(f"cannot decode audio: {first.reason}") from first
    else:
        wave, rate = _read_pyav(path, opts)
    if wave.size and not np.isfinite(wave).all():  # numpy: no torch thread pool in workers
        raise BnfixError("audio holds NaN or infinite samples")
    return torch.from_numpy(wave), rate


class _DecodeError(Exception):
    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


def _read_soundfile(path: Path, opts: AudioOptions) -> tuple[np.ndarray, int]:
    import soundfile as sf

    from bnfix.probe_audio import source_samples_needed

    try:
        with sf.SoundFile(str(path)) as f:
            rate = int(f.samplerate)
            data = f.read(frames=source_samples_needed(rate, opts), dtype="float32", always_2d=True)
    except Exception as e:  # libsndfile and its codecs raise several types on bad input
        raise _DecodeError(_sf_reason(e)) from e
    return np.ascontiguousarray(data.T), rate


def _sf_reason(e: BaseException) -> str:
    """One line from libsndfile's exception, without the file name it repeats."""
    text = getattr(e, "error_string", None) or str(e) or type(e).__name__
    return text.strip().splitlines()[0]


def _read_pyav(path: Path, opts: AudioOptions) -> tuple[np.ndarray, int]:
    """The first audio stream's prefix through FFmpeg, converted to planar float32.

    The resampler here only changes the sample format (s16, s32p, fltp... to fltp) and keeps
    the rate and channels: resampling to the model's rate is probe_audio's job, done the same
    way for every source.
    """
    from bnfix.probe_audio import source_samples_needed

    try:
        container = open_input(path)
    except Exception as e:  # av.FFmpegError, OSError, UnicodeDecodeError on odd headers
        raise BnfixError(f"cannot decode audio: {reason(e)}") from e
    with container:
        if not container.streams.audio:
            raise BnfixError("no audio track")
        stream = container.streams.audio[0]
        rate = int(stream.codec_context.sample_rate or 0)
        if rate <= 0:
            raise BnfixError("cannot decode audio: the audio track has no sample rate")
        needed = source_samples_needed(rate, opts)
        chunks: list[np.ndarray] = []
        try:
            _decode_into(container, stream, needed, chunks)
        except BnfixError:
            raise
        except Exception as e:  # av.FFmpegError subclasses, ValueError on a layout change
            if not chunks:
                raise BnfixError(f"cannot decode audio: {reason(e)}") from e
            # a damaged tail after good audio: keep what decoded, as libsndfile does
    if not chunks:
        return np.zeros((max(stream.codec_context.channels or 1, 1), 0), np.float32), rate
    data = np.concatenate(chunks, axis=1)[:, :needed]
    return np.ascontiguousarray(data, dtype=np.float32), rate


def _decode_into(container: Any, stream: Any, needed: int, chunks: list[np.ndarray]) -> int:
    """Decode frames of ``stream`` into ``chunks`` (``[channels, n]`` float32) until ``needed``."""
    av = av_module()
    resampler = None
    got = 0
    channels = None
    for frame in container.decode(stream):
        if resampler is None:
            resampler = av.AudioResampler(
                format="fltp", layout=frame.layout, rate=frame.sample_rate
            )
            channels = len(frame.layout.channels)
        for out in resampler.resample(frame):
            array = out.to_ndarray()  # planar: [channels, samples]
            if array.shape[0] != channels:
                raise BnfixError("cannot decode audio: the channel count changes mid-stream")
            chunks.append(array)
            got += array.shape[1]
        if got >= needed:
            return got
    if resampler is not None:
        for out in resampler.resample(None):
            array = out.to_ndarray()
            chunks.append(array)
            got += array.shape[1]
    return got
