"""VGGSound: ~200k ten-second YouTube clips in 309 classes, with the official train/test split.

Layout under ROOT::

    ROOT/vggsound.csv                        rows ``ytid,start,label,split`` (no header)
    ROOT/<ytid>_<start:06d>.mp4              the clips, here or in ROOT/video/ (or ``videos=DIR``)

The official CSV quotes labels that hold commas (``"male speech, man speaking"``); split is
``train`` or ``test`` (VGGSound has no validation split). The id is ``<ytid>_<start:06d>``, the
name the official download scripts give the file; a file named ``<ytid>_<start:06d>_<end:06d>``
(start + 10 s) is found too. Each row names the clip in ``video``. YouTube copies always miss
clips (deleted videos): they are reported as missing. A clip listed twice keeps its first row.
"""

from __future__ import annotations

import csv
from pathlib import Path

from bnfix.errors import BnfixError
from bnfix.recipes.common import VIDEO_EXTENSIONS, Recipe, Row, index_files, read_list_file

LAYOUT = "ROOT/vggsound.csv and ROOT/<ytid>_<start:06d>.mp4 (or ROOT/video/)"
SPLITS = {"train": "train", "test": "test", "val": "val", "validation": "val"}


def build(root: Path, videos: Path | None = None) -> Recipe:
    """One row per listed clip whose video is found, in list order."""
    if not root.is_dir():
        raise BnfixError("no such dataset folder", root)
    listing = root / "vggsound.csv"
    if not listing.is_file():
        raise BnfixError(f"no vggsound.csv; expected {LAYOUT}", root)
    if videos is not None and not Path(videos).is_dir():
        raise BnfixError("--videos: no such folder", videos)
    folders = [Path(videos)] if videos is not None else [root, root / "video"]
    files = index_files(folders, VIDEO_EXTENSIONS)
    recipe = Recipe("vggsound", root)
    seen: set[str] = set()
    repeats = 0
    for ytid, start, label, split in _read_list(listing):
        sample_id = f"{ytid}_{start:06d}"
        if sample_id in seen:
            repeats += 1
            continue
        seen.add(sample_id)
        video = files.get(sample_id) or files.get(f"{sample_id}_{start + 10:06d}")
        if video is None:
            recipe.missing.append((sample_id, f"{split}: no {sample_id}.mp4"))
            continue
        recipe.rows.append(Row(sample_id, label, split, video=video))
    if repeats:
        recipe.notes.append(f"{repeats} clips listed more than once: kept the first row of each")
    return recipe


def _read_list(path: Path) -> list[tuple[str, int, str, str]]:
    """``(ytid, start, label, split)`` per row of vggsound.csv."""
    text = read_list_file(path)
    reader = csv.reader(text.splitlines(keepends=True))
    rows = []
    try:
        for fields in reader:
            number = reader.line_num
            if not any(f.strip() for f in fields):
                continue
            fields = [f.strip() for f in fields]
            if len(fields) != 4:
                raise BnfixError(
                    f"line {number}: expected 'ytid,start,label,split' (quote labels with "
                    f"commas), got {len(fields)} fields",
                    path,
                )
            ytid, start, label, split = fields
            if not start.isdigit():
                if number == 1:
                    continue  # a header line some copies add
                raise BnfixError(f"line {number}: start {start!r} is not whole seconds", path)
            if split.lower() not in SPLITS:
                raise BnfixError(f"line {number}: unknown split {split!r}; use train or test", path)
            if not ytid or not label:
                raise BnfixError(f"line {number}: empty YouTube id or label", path)
            rows.append((ytid, int(start), label, SPLITS[split.lower()]))
    except csv.Error as e:
        raise BnfixError(f"line {reader.line_num}: bad CSV: {e}", path) from e
    return rows
