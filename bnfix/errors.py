"""The one exception type the CLI turns into a single line on stderr and exit code 2.

Library code raises :class:`BnfixError` for anything the *user* can fix (a bad path, a file
that is not a checkpoint, an architecture that does not fit). Programming errors stay ordinary
exceptions so that they surface with a traceback.
"""

from __future__ import annotations

from pathlib import Path


def one_line(exc: BaseException, limit: int | None = 160) -> str:
    """An exception's message fit for a one-line error: whitespace collapsed, length bounded.

    Library exceptions (torch, libsndfile, zip) often span several lines; the CLI's contract
    is one line on stderr.
    """
    text = " ".join(str(exc).split()) or type(exc).__name__
    if limit is None or len(text) <= limit:
        return text
    return text[:limit] + "…"


class BnfixError(Exception):
    """A user-facing error: the message is one line that names the file and what to do."""

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)
