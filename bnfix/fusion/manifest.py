"""The manifest: one CSV that says which files make up each sample of an audio-visual dataset.

Columns ``id,label,split`` and at least one of ``audio,frames,video`` (extra columns are
ignored). Paths are relative to the manifest's folder or absolute. ``audio`` is an audio file or
a video file (its audio track is used); ``frames`` a folder of extracted frames, one image or a
video file; ``video`` one video file that gives both modalities, used where ``audio`` or
``frames`` is empty (so a row may take its frames from the video and its audio from a separate
WAV). Labels are class names or integers, mapped to dense indices 0..K-1 in sorted order
(integers by value). A modality no row gives a path for is absent: a one-modality manifest.

Everything wrong with the *manifest itself* (a missing file, a missing column, an unknown split,
a duplicate id, ...) is a :class:`~bnfix.errors.BnfixError` whose one line names the row and the
column, so a user with a 20k-row CSV can jump straight to it. Files that exist but cannot be
decoded are a different matter: they are found later, by :mod:`bnfix.fusion.features`, and
skipped with a report, because scraped datasets always hold a few of them.
"""

from __future__ import annotations

import csv
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bnfix.errors import BnfixError

__all__ = ["MODALITY_COLUMNS", "SPLITS", "VIDEO_COLUMN", "Manifest", "Sample", "read_manifest"]

SPLITS = ("train", "val", "test")
#: Modality name -> the manifest column holding its path, in the order modalities are listed.
MODALITY_COLUMNS = {"audio": "audio", "visual": "frames"}
#: One video file for both modalities, where the modality's own column is empty.
VIDEO_COLUMN = "video"
#: What each column may name (``bnfix.media.media_kind`` of a file; "folder" for a directory).
_ACCEPTS = {
    "audio": ("audio", "video"),
    "frames": ("folder", "image", "video"),
    "video": ("video",),
}
REQUIRED_COLUMNS = ("id", "label", "split")
_INTEGER = re.compile(r"-?[0-9]+")


@dataclass(frozen=True)
class Sample:
    id: str
    audio: Path | None  # absolute, resolved: an audio file or a video file's audio track
    frames: Path | None  # a folder of frames, one image file, or a video file
    label: int  # index into Manifest.classes
    split: str  # "train" | "val" | "test"


@dataclass
class Manifest:
    path: Path
    samples: list[Sample]
    classes: list[str]  # labels in index order: sorted names, or integers sorted by value
    modalities: tuple[str, ...]  # subset of ("audio", "visual"), in this order

    def split(self, name: str) -> list[Sample]:
        """The samples of one split, in manifest order (an absent ``val`` gives [])."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
        return [s for s in self.samples if s.split == name]


@dataclass
class _Row:
    """One data row as read, before labels are turned into class indices."""

    number: int  # 1-based data row (the header is not a row)
    line: int  # line in the file where the row ends (quoted fields may span lines)
    id: str
    paths: dict[str, Path | None]
    label: str
    split: str


def read_manifest(path: Path) -> Manifest:
    """Read and check the manifest at ``path``; every problem names its row and column."""
    path = Path(path).expanduser()
    if not path.exists():
        raise BnfixError("no such manifest file", path)
    if path.is_dir():
        raise BnfixError("is a folder; pass the manifest CSV file", path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise BnfixError(
            f"not a UTF-8 text file (byte {e.start}); save the CSV as UTF-8", path
        ) from e
    except OSError as e:
        raise BnfixError(f"cannot read: {e.strerror or e}", path) from e
    resolver = _Paths(path.resolve().parent)
    reader = csv.reader(text.splitlines(keepends=True))
    header = _read_header(reader, path)
    present = _modalities_with_column(header)
    rows: list[_Row] = []
    try:
        for fields in reader:
            row = _read_row(len(rows) + 1, reader.line_num, fields, header, present, resolver, path)
            if row is not None:
                rows.append(row)
    except csv.Error as e:
        raise BnfixError(f"row {len(rows) + 1} (line {reader.line_num}): bad CSV: {e}", path) from e
    if not rows:
        raise BnfixError("has a header but no data rows", path)
    modalities = _used_modalities(rows, present, header, path)
    _check_unique_ids(rows, path)
    if not any(r.split == "train" for r in rows):
        raise BnfixError(
            "column 'split': no row is in the 'train' split; at least one training sample is "
            "needed",
            path,
        )
    classes, index = _classes(rows, path)
    samples = [
        Sample(
            id=r.id,
            audio=r.paths["audio"] if "audio" in modalities else None,
            frames=r.paths["visual"] if "visual" in modalities else None,
            label=index[r.label],
            split=r.split,
        )
        for r in rows
    ]
    return Manifest(path=path, samples=samples, classes=classes, modalities=modalities)


def _where(row: _Row | int, line: int | None = None, column: str | None = None) -> str:
    number = row.number if isinstance(row, _Row) else row
    line = row.line if isinstance(row, _Row) else line
    text = f"row {number} (line {line})"
    return f"{text}, column {column!r}" if column else text


def _read_header(reader: Iterator[list[str]], path: Path) -> list[str]:
    try:
        header = next(reader, None)
    except csv.Error as e:
        raise BnfixError(f"line 1: not a valid CSV header: {e}", path) from e
    if header is None or not any(h.strip() for h in header):
        raise BnfixError(
            "is empty; expected a CSV header 'id,label,split,audio,frames,video' (audio, frames, "
            "video: at least one) and one row per sample",
            path,
        )
    header = [h.strip().lower() for h in header]
    for name in header:
        if name and header.count(name) > 1:
            raise BnfixError(f"line 1: column {name!r} appears more than once in the header", path)
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        names = ", ".join(repr(c) for c in missing)
        raise BnfixError(
            f"line 1: missing column {names}; the header must name id, label, split and at "
            "least one of audio, frames, video",
            path,
        )
    if not any(c in header for c in (*MODALITY_COLUMNS.values(), VIDEO_COLUMN)):
        raise BnfixError(
            "line 1: missing column 'audio', 'frames' or 'video'; a manifest needs at least one",
            path,
        )
    return header


def _modalities_with_column(header: list[str]) -> tuple[str, ...]:
    if VIDEO_COLUMN in header:
        return tuple(MODALITY_COLUMNS)
    return tuple(m for m, column in MODALITY_COLUMNS.items() if column in header)


def _read_row(
    number: int,
    line: int,
    fields: list[str],
    header: list[str],
    present: tuple[str, ...],
    resolver: _Paths,
    path: Path,
) -> _Row | None:
    """Check one data row; ``None`` for a blank line (spreadsheets like to add them)."""
    if not any(f.strip() for f in fields):
        return None
    where = _where(number, line)
    if len(fields) != len(header):
        raise BnfixError(
            f"{where}: has {len(fields)} fields but the header has {len(header)}; "
            "quote values that contain commas",
            path,
        )
    values = {name: value.strip() for name, value in zip(header, fields, strict=True)}
    for column in ("id", "label"):
        if not values[column]:
            raise BnfixError(f"{_where(number, line, column)}: empty {column}", path)
    split = values["split"].lower()
    if split not in SPLITS:
        raise BnfixError(
            f"{_where(number, line, 'split')}: unknown split {values['split']!r}; "
            f"use one of {', '.join(SPLITS)}",
            path,
        )
    paths: dict[str, Path | None] = {"audio": None, "visual": None}
    video = values.get(VIDEO_COLUMN, "")
    video_path = _resolve(video, VIDEO_COLUMN, resolver, number, line, path) if video else None
    for modality in present:
        column = MODALITY_COLUMNS[modality]
        if values.get(column):
            paths[modality] = _resolve(values[column], column, resolver, number, line, path)
        else:
            paths[modality] = video_path
    return _Row(number, line, values["id"], paths, values["label"], split)


class _Paths:
    """Cells to real paths, as ``Path.resolve`` gives them, for one manifest read.

    A dataset's files sit in few folders: each folder is resolved once and a file in it costs
    one ``lstat`` (a symlinked file is followed in full), instead of a ``resolve`` walking
    every component and two more ``stat``s per cell (a 90k-row VGGSound manifest: 3.3 s ->
    2.3 s; what is left is mostly pathlib building the paths).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._folders: dict[Path, Path] = {}

    def real(self, value: str) -> tuple[Path, os.stat_result | None]:
        """The resolved path, and its ``stat`` (None: nothing there)."""
        target = Path(value).expanduser()
        if not target.is_absolute():
            target = self.root / target
        if target.name in ("", ".."):  # "/" or ".../..": no folder + name to split into
            return _stat_of(target.resolve())
        folder = self._folders.get(target.parent)
        if folder is None:
            folder = self._folders[target.parent] = target.parent.resolve()
        real = folder / target.name
        try:
            st = os.lstat(real)
        except OSError:
            return real, None
        return _stat_of(real.resolve()) if stat.S_ISLNK(st.st_mode) else (real, st)


def _stat_of(path: Path) -> tuple[Path, os.stat_result | None]:
    try:
        return path, os.stat(path)
    except OSError:
        return path, None


def _resolve(value: str, column: str, resolver: _Paths, number: int, line: int, path: Path) -> Path:
    """The absolute path a cell names, checked to be something this column can be read from.

    The check is by extension (and folder-ness), so a typo'd column or a stray ``.txt`` is
    refused here with its row, before hours of extraction, rather than skipped later.
    """
    from bnfix.media import AUDIO_EXTENSIONS, IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, media_kind

    target, st = resolver.real(value)
    where = _where(number, line, column)
    if st is None:
        raise BnfixError(f"{where}: no such file or folder: {value}", path)
    kind = "folder" if stat.S_ISDIR(st.st_mode) else media_kind(target)
    accepted = _ACCEPTS[column]
    if kind not in accepted:
        named = {
            "audio": f"an audio ({', '.join(AUDIO_EXTENSIONS)}) or video file",
            "frames": f"a folder of frames, an image ({', '.join(IMAGE_EXTENSIONS)}) or a video",
            "video": f"a video file ({', '.join(VIDEO_EXTENSIONS)})",
        }[column]
        what = "a folder" if kind == "folder" else f"a {target.suffix or 'extension-less'} file"
        raise BnfixError(f"{where}: is {what}; expected {named}: {value}", path)
    return target


def _used_modalities(
    rows: list[_Row], present: tuple[str, ...], header: list[str], path: Path
) -> tuple[str, ...]:
    """Modalities whose column holds a path on every row; a column empty on all rows is unused.

    A column filled on some rows only is an error rather than a silent one-modality manifest:
    training would otherwise quietly drop a modality or a part of the data.
    """
    video = VIDEO_COLUMN in header
    used = []
    for modality in present:
        filled = [r for r in rows if r.paths[modality] is not None]
        if not filled:
            continue
        if len(filled) < len(rows):
            empty = next(r for r in rows if r.paths[modality] is None)
            column = MODALITY_COLUMNS[modality]
            if video:
                column = f"{column}' and '{VIDEO_COLUMN}"
            raise BnfixError(
                f"{_where(empty, column=column)}: empty, but other rows give a path (first: "
                f"row {filled[0].number}); fill it in, or leave the column empty on every row "
                f"for a one-modality manifest",
                path,
            )
        used.append(modality)
    if not used:
        named = [c for c in (*MODALITY_COLUMNS.values(), VIDEO_COLUMN) if c in header]
        columns = " and ".join(repr(c) for c in named)
        raise BnfixError(f"column {columns}: empty on every row; no modality to read", path)
    return tuple(used)


def _check_unique_ids(rows: list[_Row], path: Path) -> None:
    first: dict[str, _Row] = {}
    for r in rows:
        if r.id in first:
            raise BnfixError(
                f"{_where(r, column='id')}: duplicate id {r.id!r} (first used on row "
                f"{first[r.id].number}); ids must be unique",
                path,
            )
        first[r.id] = r


def _classes(rows: list[_Row], path: Path) -> tuple[list[str], dict[str, int]]:
    """Class names and the label -> index map: dense indices 0..K-1, whatever the labels.

    Integer labels are sorted by value (``0, 5, 1000000`` are classes 0, 1, 2: a label's size
    never sets the size of the classifier); names are sorted, so the same set of labels gives
    the same indices whatever the row order. Two spellings of one integer (``1`` and ``01``)
    are an error rather than one class or two: either guess could be wrong.
    """
    labels = {r.label for r in rows}
    if not all(_INTEGER.fullmatch(label) for label in labels):
        classes = sorted(labels)
        return classes, {name: i for i, name in enumerate(classes)}
    spelled: dict[int, str] = {}
    for r in rows:
        first = spelled.setdefault(int(r.label), r.label)
        if first != r.label:
            row = next(x for x in rows if x.label == first)
            raise BnfixError(
                f"{_where(r, column='label')}: label {r.label!r} is the integer {int(r.label)}, "
                f"like label {first!r} on row {row.number}; write each class one way",
                path,
            )
    classes = [spelled[value] for value in sorted(spelled)]
    return classes, {label: i for i, label in enumerate(classes)}
