"""Write a bnfix fusion manifest for a dataset laid out like the paper's Kinetics-Sounds copy.

Expected layout under ROOT (the official FusT code's, with one audio file and one folder of
extracted frames per clip)::

    ROOT/audio/<split>/<id>.wav              (or .flac / .ogg)
    ROOT/visual/<split>/<id>/frame_*.jpg     (any .jpg/.jpeg/.png names; sorted naturally)

and one label list per split, given with ``--labels``: either one file per split named
``<split>.txt`` / ``<split>.csv`` in a folder, or one CSV for all splits. Accepted line formats:

    <id>,<label>                 CSV (a header line "id,label" is allowed)
    <id>,<label>,<split>         CSV with a split column (one file for all splits)
    <path/to/id> <label>         the official code's "train_1fps_path.txt" lines: the id is the
                                 last path component, the label the last field

Labels may be class names or integers. Splits are ``train``, ``val`` (optional) and ``test``.
Clips listed without their audio file or frame folder are reported and left out (``--strict``
makes that an error), since downloaded copies of KS always miss a few videos.

    python examples/make_manifest.py ROOT --labels ROOT/lists --out ROOT/manifest.csv
    python examples/make_manifest.py ROOT --labels labels.csv --absolute --out manifest.csv
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

SPLITS = ("train", "val", "test")
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg")
FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png")


class UsageError(Exception):
    """A problem the user can fix; printed as one line, exit code 2."""


def read_label_lists(labels: Path) -> dict[str, list[tuple[str, str]]]:
    """``{split: [(id, label), ...]}`` from a folder of per-split lists or one combined CSV."""
    if labels.is_dir():
        lists: dict[str, list[tuple[str, str]]] = {}
        for split in SPLITS:
            found = [labels / f"{split}{ext}" for ext in (".csv", ".txt")]
            found = [p for p in found if p.is_file()]
            if len(found) > 1:
                raise UsageError(f"{labels}: both {found[0].name} and {found[1].name}; keep one")
            if found:
                lists[split] = [(i, lab) for i, lab, _ in _read_list(found[0], split)]
        if not lists:
            raise UsageError(f"{labels}: no train.txt/.csv, val.txt/.csv or test.txt/.csv inside")
        return lists
    if not labels.is_file():
        raise UsageError(f"{labels}: no such labels file or folder")
    lists = {}
    for sample_id, label, split in _read_list(labels, None):
        lists.setdefault(split, []).append((sample_id, label))
    return lists


def _read_list(path: Path, split: str | None) -> list[tuple[str, str, str]]:
    """Rows ``(id, label, split)`` of one list file; ``split`` None: taken from a column."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: cannot read: {e}") from e
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = next(csv.reader([line])) if "," in line else line.split()
        fields = [f.strip() for f in fields]
        if number == 1 and [f.lower() for f in fields[:2]] == ["id", "label"]:
            continue  # header
        where = f"{path}: line {number}"
        if split is None:
            if len(fields) != 3:
                raise UsageError(f"{where}: expected 'id,label,split', got {line.strip()!r}")
            sample_id, label, row_split = fields
            if row_split.lower() not in SPLITS:
                raise UsageError(f"{where}: unknown split {row_split!r}; use {', '.join(SPLITS)}")
            row_split = row_split.lower()
        else:
            if len(fields) < 2:
                raise UsageError(f"{where}: expected '<id>,<label>' or '<path> <label>'")
            sample_id, label, row_split = fields[0], fields[-1], split
        sample_id = sample_id.rstrip("/").split("/")[-1]  # official lists hold paths
        if not sample_id or not label:
            raise UsageError(f"{where}: empty id or label")
        rows.append((sample_id, label, row_split))
    return rows


def find_audio(root: Path, split: str, sample_id: str) -> Path | None:
    for ext in AUDIO_EXTENSIONS:
        path = root / "audio" / split / f"{sample_id}{ext}"
        if path.is_file():
            return path
    return None


def has_frames(folder: Path) -> bool:
    if not folder.is_dir():
        return False
    with os.scandir(folder) as it:
        return any(Path(e.name).suffix.lower() in FRAME_EXTENSIONS for e in it)


def build_rows(
    root: Path, lists: dict[str, list[tuple[str, str]]], out_dir: Path, absolute: bool
) -> tuple[list[list[str]], list[str]]:
    """Manifest rows and the list of clips left out (with why)."""
    rows: list[list[str]] = []
    missing: list[str] = []
    seen: dict[str, str] = {}
    for split in SPLITS:
        for sample_id, label in lists.get(split, []):
            if sample_id in seen:
                raise UsageError(f"id {sample_id!r} is listed in {seen[sample_id]} and {split}")
            seen[sample_id] = split
            audio = find_audio(root, split, sample_id)
            frames = root / "visual" / split / sample_id
            lacks = [
                name for name, ok in (("audio", audio), ("frames", has_frames(frames))) if not ok
            ]
            if lacks:
                missing.append(f"{split}/{sample_id}: no {' and no '.join(lacks)}")
                continue
            assert audio is not None
            rows.append(
                [
                    sample_id,
                    _ref(audio, out_dir, absolute),
                    _ref(frames, out_dir, absolute),
                    label,
                    split,
                ]
            )
    return rows, missing


def _ref(path: Path, out_dir: Path, absolute: bool) -> str:
    """How the manifest names a path: relative to its own folder unless asked otherwise."""
    path = path.resolve()
    return str(path) if absolute else os.path.relpath(path, out_dir.resolve())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Write a bnfix fusion manifest (id,audio,frames,label,split) for a "
        "Kinetics-Sounds style dataset: ROOT/audio/<split>/<id>.wav and "
        "ROOT/visual/<split>/<id>/frame_*.jpg.",
        epilog="The --labels formats are described at the top of this script.",
    )
    parser.add_argument("root", type=Path, help="dataset root holding audio/ and visual/")
    parser.add_argument(
        "--labels",
        type=Path,
        required=True,
        help="folder with train/val/test .txt or .csv lists, or one CSV 'id,label,split'",
    )
    parser.add_argument("--out", type=Path, default=None, help="default: ROOT/manifest.csv")
    parser.add_argument("--absolute", action="store_true", help="write absolute paths")
    parser.add_argument(
        "--strict", action="store_true", help="fail when a listed clip lacks audio or frames"
    )
    parser.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    args = parser.parse_args(argv)
    try:
        return run(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    root: Path = args.root
    for sub in ("audio", "visual"):
        if not (root / sub).is_dir():
            raise UsageError(
                f"{root}: no {sub}/ folder; expected ROOT/audio/<split>/<id>.wav "
                "and ROOT/visual/<split>/<id>/frame_*.jpg"
            )
    out: Path = args.out or root / "manifest.csv"
    if out.exists() and not args.force:
        raise UsageError(f"{out}: exists; pass --force to overwrite it")
    lists = read_label_lists(args.labels)
    if not lists.get("train"):
        raise UsageError(f"{args.labels}: no train samples listed")
    out.parent.mkdir(parents=True, exist_ok=True)
    rows, missing = build_rows(root, lists, out.parent, args.absolute)
    if missing:
        for line in missing[:20]:
            print(f"missing: {line}", file=sys.stderr)
        if len(missing) > 20:
            print(f"missing: ... and {len(missing) - 20} more", file=sys.stderr)
        if args.strict:
            raise UsageError(f"{len(missing)} listed clips lack their audio or frames (--strict)")
    if not any(r[4] == "train" for r in rows):
        raise UsageError("none of the listed train clips has both audio and frames")
    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "audio", "frames", "label", "split"])
        writer.writerows(rows)
    tmp.replace(out)
    counts = ", ".join(f"{s} {sum(r[4] == s for r in rows)}" for s in SPLITS)
    print(f"wrote {out}: {len(rows)} clips ({counts}); {len(missing)} left out")
    return 0


if __name__ == "__main__":
    sys.exit(main())
