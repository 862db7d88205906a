"""AVE (Audio-Visual Event): 4143 ten-second YouTube videos in 28 event categories.

Layout under ROOT (the public release)::

    ROOT/trainSet.txt, valSet.txt, testSet.txt   the ECCV 2018 paper's split (valSet optional)
    ROOT/Annotations.txt                         all samples (not needed when the lists exist)
    ROOT/AVE/<VideoID>.mp4                       the videos (or ``videos=DIR``)

List lines are ``Category&VideoID&Quality&StartTime&EndTime`` (a header line starting with
``Category&`` is skipped), e.g. ``Church bell&RUhOCu3LNXM&good&0&10``; categories hold spaces
and commas (``Male speech, man speaking``), which ``&`` keeps apart. The label is the category,
the id the VideoID, and each row names the video in ``video`` (both modalities from one file).
The whole video is the sample, as in the classification setting of the OGM-GE and FusT papers;
the event's start and end times are not used.

A few videos hold two events and are listed twice: every occurrence of such a VideoID gets the
id ``<VideoID>_<start>_<end>`` so ids stay unique. An identical line repeated is kept once.
"""

from __future__ import annotations

from pathlib import Path

from bnfix.errors import BnfixError
from bnfix.recipes.common import SPLITS, VIDEO_EXTENSIONS, Recipe, Row, index_files, read_list_file

LISTS = {"train": "trainSet.txt", "val": "valSet.txt", "test": "testSet.txt"}
LAYOUT = "ROOT/trainSet.txt, ROOT/testSet.txt and ROOT/AVE/<VideoID>.mp4"


def build(root: Path, videos: Path | None = None) -> Recipe:
    """One row per listed sample whose video is found."""
    if not root.is_dir():
        raise BnfixError("no such dataset folder", root)
    for split in ("train", "test"):
        if not (root / LISTS[split]).is_file():
            raise BnfixError(f"no {LISTS[split]}; expected {LAYOUT}", root)
    folder = Path(videos) if videos is not None else root / "AVE"
    if not folder.is_dir():
        what = f"--videos {folder}: no such folder" if videos else "no AVE/ folder of videos"
        raise BnfixError(f"{what}; expected {LAYOUT}", root)
    entries: list[tuple[str, str, str, str, str]] = []  # split, category, video id, start, end
    seen: set[tuple[str, ...]] = set()
    repeats = 0
    for split in SPLITS:
        path = root / LISTS[split]
        if not path.is_file():
            continue
        for entry in _read_list(path):
            if (split, *entry) in seen:
                repeats += 1
                continue
            seen.add((split, *entry))
            entries.append((split, *entry))
    counts: dict[str, int] = {}
    for e in entries:
        counts[e[2]] = counts.get(e[2], 0) + 1
    files = index_files([folder], VIDEO_EXTENSIONS)
    recipe = Recipe("ave", root)
    if repeats:
        recipe.notes.append(f"{repeats} repeated list lines kept once")
    twice = sum(1 for n in counts.values() if n > 1)
    if twice:
        recipe.notes.append(f"{twice} videos listed more than once: ids <VideoID>_<start>_<end>")
    for split, category, video_id, start, end in entries:
        sample_id = video_id if counts[video_id] == 1 else f"{video_id}_{start}_{end}"
        video = files.get(video_id)
        if video is None:
            recipe.missing.append((sample_id, f"{split}: no {folder.name}/{video_id}.mp4"))
            continue
        recipe.rows.append(Row(sample_id, category, split, video=video))
    return recipe


def _read_list(path: Path) -> list[tuple[str, str, str, str]]:
    """``(category, video id, start, end)`` per line of an AVE list file."""
    text = read_list_file(path)
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split("&")]
        if fields[0] == "Category":
            continue  # header
        if len(fields) != 5 or not fields[0] or not fields[1]:
            raise BnfixError(
                f"line {number}: expected 'Category&VideoID&Quality&StartTime&EndTime', "
                f"got {line.strip()!r}",
                path,
            )
        entries.append((fields[0], fields[1], fields[3], fields[4]))
    return entries
