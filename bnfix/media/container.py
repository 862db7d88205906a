"""Opening media with PyAV: one place for the import, the log level and the error wording.

FFmpeg logs through PyAV's callback; PyAV leaves that callback off unless asked
(``av.logging.get_level() is None``), which is what keeps a corrupt file to one line on the
CLI. :func:`quiet` re-asserts it in case an embedding program turned logging on at a chatty
level: FFmpeg's warnings about a damaged stream are then demoted to errors only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bnfix.errors import one_line


def av_module() -> Any:
    """``import av`` on first use: it costs ~0.1 s, which a scan of WAV files need not pay."""
    import av

    quiet(av)
    return av


def quiet(av: Any) -> None:
    """Keep FFmpeg below warnings if someone enabled its logging (None, PyAV's default, stays)."""
    level = av.logging.get_level()
    if level is not None and level > av.logging.ERROR:
        av.logging.set_level(av.logging.ERROR)


def open_input(path: Path) -> Any:
    """``av.open(path)`` for reading, with metadata errors ignored (odd tags are common)."""
    av = av_module()
    return av.open(str(path), mode="r", metadata_errors="ignore")


def reason(e: BaseException) -> str:
    """One line from a PyAV/FFmpeg exception, without the ``[Errno N]`` and the file name.

    FFmpegError carries ``strerror`` (e.g. "Invalid data found when processing input"); other
    exceptions fall back to their one-line text.
    """
    text = getattr(e, "strerror", None)
    if isinstance(text, str) and text.strip():
        return one_line(Exception(text))
    return one_line(e)
