"""Which files bnfix reads as audio, video or images, by extension.

One table for the probe, the fusion feature extraction and anything else that walks a folder
of media: a file counts as what its (lower-cased) extension says, without opening it, so that
listing a folder of ten thousand clips costs nothing.
"""

from __future__ import annotations

from pathlib import Path

#: Audio-only files. wav/flac/ogg go through libsndfile; the rest (and soundfile failures) PyAV.
AUDIO_EXTENSIONS: tuple[str, ...] = (
    ".wav",
    ".flac",
    ".ogg",
    ".mp3",
    ".m4a",
    ".aac",
    ".opus",
    ".oga",
    ".wma",
    ".aiff",
    ".aif",
)
#: Containers read with PyAV; their audio track can also serve as an audio sample.
VIDEO_EXTENSIONS: tuple[str, ...] = (
    ".mp4",
    ".mkv",
    ".webm",
    ".avi",
    ".flv",
    ".mov",
    ".m4v",
    ".mpg",
    ".mpeg",
    ".ts",
    ".mts",
    ".m2ts",
    ".vob",
    ".3gp",
    ".wmv",
    ".ogv",
)
#: Still images (Pillow); video frames extracted to folders are images too.
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

#: Extensions libsndfile decodes (tried first: exact, and no FFmpeg needed).
SOUNDFILE_EXTENSIONS: tuple[str, ...] = (".wav", ".flac", ".ogg", ".oga", ".aiff", ".aif")

_KINDS = (("audio", AUDIO_EXTENSIONS), ("video", VIDEO_EXTENSIONS), ("image", IMAGE_EXTENSIONS))


def media_kind(path: Path) -> str | None:
    """``"audio"``, ``"video"``, ``"image"`` or None, from the extension alone (lower-cased)."""
    suffix = Path(path).suffix.lower()
    for kind, extensions in _KINDS:
        if suffix in extensions:
            return kind
    return None
