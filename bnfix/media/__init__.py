"""Media decoding for probes and fusion features: audio tracks, video frames, file kinds.

Images stay with :func:`bnfix.probe_image.decode_rgb`; this package adds what needs FFmpeg
(through PyAV, imported on first use): compressed audio and the audio track of videos
(:func:`read_audio`), and frames of videos at given times (:func:`read_frames`), by seeking.
"""

from __future__ import annotations

from bnfix.media.audio import read_audio
from bnfix.media.kinds import AUDIO_EXTENSIONS, IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, media_kind
from bnfix.media.video import (
    VideoInfo,
    decode_stats,
    read_frames,
    read_frames_at_fps,
    read_segments,
    reset_decode_stats,
    segment_times,
    video_info,
)

__all__ = [
    "AUDIO_EXTENSIONS",
    "IMAGE_EXTENSIONS",
    "VIDEO_EXTENSIONS",
    "VideoInfo",
    "decode_stats",
    "media_kind",
    "read_audio",
    "read_frames",
    "read_frames_at_fps",
    "read_segments",
    "reset_decode_stats",
    "segment_times",
    "video_info",
]
