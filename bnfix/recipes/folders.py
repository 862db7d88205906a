"""Any dataset sorted into folders: ``ROOT/<split>/<class>/<sample>``.

Each entry of a class folder is a sample (or part of one): a video file goes to ``video``, an
audio file to ``audio``, an image or a folder of images (extracted frames) to ``frames``.
Entries of one class folder that share a stem form one sample, so ``dog/x.wav`` with the frame
folder ``dog/x/`` (or ``dog/x.jpg``) is one two-modality sample; two entries of the same kind
with one stem (``x.wav`` and ``x.flac``) are an error. Hidden entries and other file types are
skipped (counted in a note).

Ids: the stem, when stems are unique over the whole dataset; otherwise ``<class>/<stem>`` for
every row, or ``<split>/<class>/<stem>`` when even that repeats. One rule for all rows, so an id
never depends on which other file happens to share its stem.

When some samples give both modalities, a sample that gives one only (and no video) is reported
as missing the other: a manifest column must be filled on every row or on none. ``train/`` is
required; ``val/`` and ``test/`` are optional, and each split may go by the other names
public datasets use (``training/``, ``validation/``, ``valid/``, ``validate/``, ``dev/``,
``testing/``); other folders under ROOT are ignored, with a note naming them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from bnfix.errors import BnfixError
from bnfix.recipes.common import (
    AUDIO_EXTENSIONS,
    IMAGE_EXTENSIONS,
    SPLITS,
    VIDEO_EXTENSIONS,
    Recipe,
    Row,
    has_images,
)

LAYOUT = "ROOT/<split>/<class>/<sample> with split train, val or test"
#: The folder names each split goes by in public datasets and their download scripts; a
#: dataset uses one per split.
SPLIT_FOLDERS = {
    "train": ("train", "training"),
    "val": ("val", "valid", "validation", "validate", "dev"),
    "test": ("test", "testing"),
}


@dataclass
class _Sample:
    split: str
    label: str
    stem: str
    audio: Path | None = None
    frames: Path | None = None
    video: Path | None = None


def build(root: Path) -> Recipe:
    """One row per sample, in split, class and stem order."""
    if not root.is_dir():
        raise BnfixError("no such dataset folder", root)
    folders = _split_folders(root)
    if "train" not in folders:
        raise BnfixError(f"no train/ folder; expected {LAYOUT}", root)
    recipe = Recipe("folders", root)
    others = sorted(
        e.name + "/" for e in _entries(root) if e.is_dir() and e not in folders.values()
    )
    if others:
        recipe.notes.append(f"ignored folders that name no split: {', '.join(others)}")
    samples: list[_Sample] = []
    skipped = 0
    empty_dirs: list[_Sample] = []
    for split in SPLITS:
        if split not in folders:
            continue
        for class_dir in _entries(folders[split]):
            if not class_dir.is_dir():
                skipped += 1
                continue
            found: dict[str, _Sample] = {}
            for entry in _entries(class_dir):
                kind = _kind(entry)
                stem = entry.name if entry.is_dir() else entry.stem
                if kind is None:
                    if entry.is_dir():
                        empty_dirs.append(_Sample(split, class_dir.name, stem))
                    else:
                        skipped += 1
                    continue
                sample = found.setdefault(stem, _Sample(split, class_dir.name, stem))
                if getattr(sample, kind) is not None:
                    raise BnfixError(
                        f"{getattr(sample, kind).name} and {entry.name} are both {kind} for "
                        f"sample {stem!r}; keep one",
                        class_dir,
                    )
                setattr(sample, kind, entry)
            samples.extend(found.values())
    if skipped:
        recipe.notes.append(f"skipped {skipped} entries that are not audio, video or images")
    known = {(s.split, s.label, s.stem) for s in samples}
    empty_dirs = [s for s in empty_dirs if (s.split, s.label, s.stem) not in known]
    ids = _ids(samples + empty_dirs)
    for s in empty_dirs:  # a frame folder without frames: a sample whose files are missing
        recipe.missing.append((ids[id(s)], f"{s.split}: folder {s.stem}/ holds no images"))
    gives_audio = any(s.audio or s.video for s in samples)
    gives_frames = any(s.frames or s.video for s in samples)
    for s in samples:
        lacks = []
        if gives_audio and not (s.audio or s.video):
            lacks.append("audio")
        if gives_frames and not (s.frames or s.video):
            lacks.append("frames")
        if lacks:
            recipe.missing.append((ids[id(s)], f"{s.split}: no {' and no '.join(lacks)}"))
            continue
        recipe.rows.append(Row(ids[id(s)], s.label, s.split, s.audio, s.frames, s.video))
    return recipe


def _entries(folder: Path) -> list[Path]:
    """The visible entries of a folder, sorted by name (so the manifest order is stable)."""
    with os.scandir(folder) as it:
        return [folder / e.name for e in sorted(it, key=lambda e: e.name) if e.name[0] != "."]


def _kind(entry: Path) -> str | None:
    """Which manifest column an entry fills, or None when it is none of them."""
    if entry.is_dir():
        return "frames" if has_images(entry) else None
    suffix = entry.suffix.lower()
    if suffix in VIDEO_EXTENSIONS:
        return "video"
    if suffix in AUDIO_EXTENSIONS:
        return "audio"
    if suffix in IMAGE_EXTENSIONS:
        return "frames"
    return None


def _split_folders(root: Path) -> dict[str, Path]:
    """Each split's folder under ``root``, by any of its names; two names for one split is
    an error (which of them holds the split would be a guess)."""
    found = {}
    for split in SPLITS:
        present = [root / name for name in SPLIT_FOLDERS[split] if (root / name).is_dir()]
        if len(present) > 1:
            names = " and ".join(f"{p.name}/" for p in present)
            raise BnfixError(f"both {names} hold the {split} split; keep one", root)
        if present:
            found[split] = present[0]
    return found


def _ids(samples: list[_Sample]) -> dict[int, str]:
    """``{id(sample): manifest id}`` by the module's rule: the shortest form unique for all."""
    forms = (
        lambda s: s.stem,
        lambda s: f"{s.label}/{s.stem}",
        lambda s: f"{s.split}/{s.label}/{s.stem}",
    )
    for form in forms:
        names = [form(s) for s in samples]
        if len(set(names)) == len(names) or form is forms[-1]:
            return {id(s): n for s, n in zip(samples, names, strict=True)}
    raise AssertionError("unreachable")
