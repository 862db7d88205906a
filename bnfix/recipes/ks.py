"""Kinetics-Sounds as the official FusT code lays it out: audio files and frame folders.

Layout under ROOT::

    ROOT/audio/<split>/<id>.wav              (or any audio extension)
    ROOT/visual/<split>/<id>/frame_*.jpg     (any .jpg/.jpeg/.png names; sorted naturally)
    ROOT/video/<split>/<id>.mp4              (optional: where a clip is kept as one video file)

A clip needs its audio (or its video) and its frames (or its video); with both, the manifest
names all three and the reader prefers the separate audio and frames. The labels come from
``--labels``: a folder holding one list per split (``<split>.txt`` or ``<split>.csv``), or one
CSV for all splits. Line formats:

    <id>,<label>                 CSV (a header line "id,label" is allowed; a split column
                                 naming the list's own split too)
    <id>,<label>,<split>         CSV with a split column (the one-file form)
    <path/to/id> <label>         the official code's "train_1fps_path.txt" lines: the id is the
                                 last path component, the label the rest of the line (class
                                 names hold spaces: "playing bass guitar")
    <path/to/id> <n>... <label>  numbers between (frame counts): the label is the last field

Labels are class names or integers; splits ``train``, ``val`` (optional) and ``test``. Clips
listed without their files are reported (downloaded copies of KS always miss a few videos).
"""

from __future__ import annotations

import csv
from pathlib import Path

from bnfix.errors import BnfixError
from bnfix.recipes.common import (
    AUDIO_EXTENSIONS,
    SPLITS,
    VIDEO_EXTENSIONS,
    Recipe,
    Row,
    find_file,
    has_images,
    read_list_file,
)

LAYOUT = (
    "ROOT/audio/<split>/<id>.wav and ROOT/visual/<split>/<id>/frame_*.jpg "
    "(or ROOT/video/<split>/<id>.mp4)"
)


def build(root: Path, labels: Path | None = None) -> Recipe:
    """Rows for every listed clip whose files are found; the others in ``missing``."""
    if labels is None:
        raise BnfixError("the ks format needs --labels (a folder of split lists or one CSV)")
    if not root.is_dir():
        raise BnfixError("no such dataset folder", root)
    has_video = (root / "video").is_dir()
    if not has_video:
        for sub in ("audio", "visual"):
            if not (root / sub).is_dir():
                raise BnfixError(f"no {sub}/ folder; expected {LAYOUT}", root)
    lists = read_label_lists(Path(labels))
    if not lists.get("train"):
        raise BnfixError("no train samples listed", labels)
    recipe = Recipe("ks", root)
    seen: dict[str, str] = {}
    for split in SPLITS:
        for sample_id, label in lists.get(split, []):
            if sample_id in seen:
                raise BnfixError(f"id {sample_id!r} is listed in {seen[sample_id]} and {split}")
            seen[sample_id] = split
            audio = find_file(root / "audio" / split, sample_id, AUDIO_EXTENSIONS)
            folder = root / "visual" / split / sample_id
            frames = folder if has_images(folder) else None
            video = (
                find_file(root / "video" / split, sample_id, VIDEO_EXTENSIONS)
                if has_video
                else None
            )
            if (audio or video) and (frames or video):
                recipe.rows.append(Row(sample_id, label, split, audio, frames, video))
                continue
            lacks = [n for n, p in (("audio", audio), ("frames", frames)) if p is None]
            what = " and no ".join(lacks) + (" (and no video)" if has_video else "")
            recipe.missing.append((sample_id, f"{split}: no {what}"))
    return recipe


def read_label_lists(labels: Path) -> dict[str, list[tuple[str, str]]]:
    """``{split: [(id, label), ...]}`` from a folder of per-split lists or one combined CSV."""
    if labels.is_dir():
        lists: dict[str, list[tuple[str, str]]] = {}
        for split in SPLITS:
            found = [labels / f"{split}{ext}" for ext in (".csv", ".txt")]
            found = [p for p in found if p.is_file()]
            if len(found) > 1:
                raise BnfixError(f"both {found[0].name} and {found[1].name}; keep one", labels)
            if found:
                lists[split] = [(i, lab) for i, lab, _ in _read_list(found[0], split)]
        if not lists:
            raise BnfixError("no train.txt/.csv, val.txt/.csv or test.txt/.csv inside", labels)
        return lists
    if not labels.is_file():
        raise BnfixError("no such labels file or folder", labels)
    lists = {}
    for sample_id, label, split in _read_list(labels, None):
        lists.setdefault(split, []).append((sample_id, label))
    return lists


def _read_list(path: Path, split: str | None) -> list[tuple[str, str, str]]:
    """Rows ``(id, label, split)`` of one list file; ``split`` None: taken from a column."""
    text = read_list_file(path)
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = next(csv.reader([line])) if "," in line else line.split()
        fields = [f.strip() for f in fields]
        if number == 1 and [f.lower() for f in fields[:2]] == ["id", "label"]:
            continue  # header
        where = f"line {number}"
        if split is None:
            if len(fields) != 3:
                raise BnfixError(f"{where}: expected 'id,label,split', got {line.strip()!r}", path)
            sample_id, label, row_split = fields
            if row_split.lower() not in SPLITS:
                raise BnfixError(
                    f"{where}: unknown split {row_split!r}; use {', '.join(SPLITS)}", path
                )
            row_split = row_split.lower()
        else:
            sample_id, label = fields[0], _label(fields, "," in line, split, where, path)
            row_split = split
        sample_id = sample_id.rstrip("/").split("/")[-1]  # official lists hold paths
        if not sample_id or not label:
            raise BnfixError(f"{where}: empty id or label", path)
        rows.append((sample_id, label, row_split))
    return rows


def _label(fields: list[str], comma: bool, split: str, where: str, path: Path) -> str:
    """The label of one line of a per-split list: ``id,label`` (or ``id,label,<this split>``),
    ``<path> <label>`` with the class name's own spaces (``playing bass guitar``), or
    ``<path> <frames...> <label>`` with numbers between. Anything else is refused rather than
    guessed: taking the last field made three guitar classes one ``guitar``, and a split
    column the label."""
    if len(fields) < 2:
        raise BnfixError(f"{where}: expected '<id>,<label>' or '<path> <label>'", path)
    if comma:
        if len(fields) == 3 and fields[2].lower() == split:
            return fields[1]
        if len(fields) != 2:
            raise BnfixError(
                f"{where}: expected '<id>,<label>' in {path.name} (a {split} list); quote a "
                f"label holding commas, got {','.join(fields)!r}",
                path,
            )
        return fields[1]
    rest = fields[1:]
    numbers = [f.lstrip("-").isdigit() for f in rest]
    if len(rest) == 1 or all(numbers[:-1]):
        return rest[-1]
    if not any(numbers):
        return " ".join(rest)
    raise BnfixError(
        f"{where}: cannot tell the label from {' '.join(fields)!r}; write the list as CSV "
        "('<id>,<label>')",
        path,
    )
