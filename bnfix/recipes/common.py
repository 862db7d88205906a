"""What every dataset recipe shares: the row and recipe types, media extensions, the writer.

A recipe only looks at names (file names, folder layout, list files): it never decodes a file,
so building a manifest for 200k clips takes seconds. Files that exist but cannot be decoded are
found later by the feature extraction, which skips them with a report.
"""

from __future__ import annotations

import contextlib
import csv
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path

from bnfix.errors import BnfixError
from bnfix.media.kinds import AUDIO_EXTENSIONS, IMAGE_EXTENSIONS, VIDEO_EXTENSIONS

__all__ = [
    "AUDIO_EXTENSIONS",
    "HEADER",
    "IMAGE_EXTENSIONS",
    "SPLITS",
    "VIDEO_EXTENSIONS",
    "Recipe",
    "Row",
    "check_out",
    "find_file",
    "has_images",
    "index_files",
    "read_list_file",
    "recording_reads",
    "require_dirs",
    "write_manifest",
]

SPLITS = ("train", "val", "test")
HEADER = ("id", "label", "split", "audio", "frames", "video")


@dataclass(frozen=True)
class Row:
    """One manifest row; a path is None where the sample has no file of that kind."""

    id: str
    label: str
    split: str
    audio: Path | None = None  # an audio file, or a video file read for its audio track
    frames: Path | None = None  # a folder of frames, one image, or a video file
    video: Path | None = None  # one video file giving both modalities


@dataclass
class Recipe:
    """A dataset turned into rows, plus the listed clips whose files were not found."""

    format: str
    root: Path
    rows: list[Row] = field(default_factory=list)
    missing: list[tuple[str, str]] = field(default_factory=list)  # (id, what is missing)
    notes: list[str] = field(default_factory=list)  # one-line facts worth printing
    inputs: list[Path] = field(default_factory=list)  # the dataset's list files it read

    def protected(self) -> Iterator[Path]:
        """Every file the manifest must never replace: the lists read and the rows' media."""
        yield from self.inputs
        for r in self.rows:
            yield from (p for p in (r.audio, r.frames, r.video) if p is not None)

    def counts(self) -> dict[str, dict[str, int]]:
        """``{label: {split: rows}}`` with every split present (0 where a class has none);
        labels sorted as the manifest reader sorts them."""
        per = Counter((r.label, r.split) for r in self.rows)
        labels = sorted({r.label for r in self.rows}, key=_label_key)
        return {label: {s: per[(label, s)] for s in SPLITS} for label in labels}

    def split_counts(self) -> dict[str, int]:
        """Rows per split (all three, 0 where absent)."""
        per = Counter(r.split for r in self.rows)
        return {s: per[s] for s in SPLITS}


def _label_key(label: str) -> tuple[int, int | str]:
    """Integer labels by value, then names alphabetically (as ``read_manifest`` numbers them)."""
    try:
        return (0, int(label))
    except ValueError:
        return (1, label)


def require_dirs(root: Path, names: Iterable[str], layout: str) -> None:
    """One error line naming the first expected folder that ROOT lacks, and the layout."""
    if not root.is_dir():
        raise BnfixError("no such dataset folder", root)
    for name in names:
        if not (root / name).is_dir():
            raise BnfixError(f"no {name}/ folder; expected {layout}", root)


def find_file(folder: Path, stem: str, extensions: Iterable[str]) -> Path | None:
    """``folder/<stem><ext>`` for the first extension that exists (lower or upper case)."""
    for ext in extensions:
        for candidate in (folder / f"{stem}{ext}", folder / f"{stem}{ext.upper()}"):
            if candidate.is_file():
                return candidate
    return None


def index_files(folders: Iterable[Path], extensions: Iterable[str]) -> dict[str, Path]:
    """``{stem: file}`` over the files directly in ``folders`` (the first folder wins a stem).

    One directory listing instead of one ``stat`` per listed clip: VGGSound lists 200k clips.
    """
    wanted = tuple(extensions)
    found: dict[str, Path] = {}
    for folder in folders:
        if not folder.is_dir():
            continue
        with os.scandir(folder) as entries:
            names = sorted(
                e.name
                for e in entries
                if not e.name.startswith(".")
                and os.path.splitext(e.name)[1].lower() in wanted
                and e.is_file()
            )
        for name in names:
            found.setdefault(os.path.splitext(name)[0], folder / name)
    return found


def has_images(folder: Path) -> bool:
    """Whether a folder holds at least one image (a usable folder of extracted frames)."""
    if not folder.is_dir():
        return False
    with os.scandir(folder) as entries:
        return any(Path(e.name).suffix.lower() in IMAGE_EXTENSIONS for e in entries)


def check_out(out: Path, force: bool, recipe: Recipe | None = None) -> None:
    """Refuse an output that is a folder, or a file that exists (unless ``force``), or (given
    the ``recipe``) one of the dataset's own files: a list it read or a clip it names, even
    with ``force``."""
    out = Path(out).expanduser()
    try:
        if out.is_dir():
            raise BnfixError("is a folder; --out names the manifest CSV file", out)
        if not out.exists():
            return
        if not force:
            raise BnfixError("exists; pass --force to overwrite it", out)
        if recipe is not None:
            _refuse_dataset_file(out, recipe)
    except OSError as e:  # e.g. a parent folder that cannot be searched
        raise BnfixError(f"cannot check: {e.strerror or e}", out) from e


def _refuse_dataset_file(out: Path, recipe: Recipe) -> None:
    """A BnfixError when the existing ``out`` is (the same file as) one of ``recipe``'s inputs.

    Compared by device and inode, so a symbolic or hard link to an input is caught too; only
    reached when ``out`` exists and ``--force`` is given, so the stat per row costs nothing else.
    """
    target = out.stat()
    key = (target.st_dev, target.st_ino)
    for path in recipe.protected():
        try:
            st = os.stat(path)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == key:
            raise BnfixError(
                f"is the dataset's own {path.name}, an input of this manifest; --force never "
                "replaces a dataset file, pick another --out",
                out,
            )


#: The list of files ``read_list_file`` has read inside ``recording_reads()`` (None outside).
_READS: ContextVar[list[Path] | None] = ContextVar("bnfix_recipe_reads", default=None)


@contextlib.contextmanager
def recording_reads() -> Iterator[list[Path]]:
    """Collect the paths every ``read_list_file`` call reads while the block runs (so a
    recipe's input files are known without each recipe listing them)."""
    read: list[Path] = []
    token = _READS.set(read)
    try:
        yield read
    finally:
        _READS.reset(token)


def read_list_file(path: Path) -> str:
    """A dataset's list or annotation file as text (a UTF-8 byte-order mark dropped)."""
    read = _READS.get()
    if read is not None:
        read.append(Path(path))
    try:
        return path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise BnfixError(f"cannot read: {e}", path) from e


def write_manifest(recipe: Recipe, out: Path, absolute: bool = False, force: bool = False) -> Path:
    """Write ``recipe.rows`` as a manifest CSV at ``out``; returns the path written.

    Paths are relative to ``out``'s folder unless ``absolute`` (so the dataset and its manifest
    can move together). The file appears whole or not at all: rows go to a temporary file in the
    same folder, which then replaces ``out`` in one rename; an existing ``out`` is kept unless
    ``force``.
    """
    out = Path(out).expanduser()
    check_out(out, force, recipe)
    if not recipe.rows:
        raise BnfixError("no rows to write", recipe.root)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError as e:  # a file where the folder should be
        raise BnfixError(f"cannot create folder {out.parent}: not a folder", out) from e
    except OSError as e:
        raise BnfixError(f"cannot create folder {out.parent}: {e.strerror or e}", out) from e
    base = out.parent.resolve()

    def ref(path: Path | None) -> str:
        if path is None:
            return ""
        path = path.resolve()
        return str(path) if absolute else os.path.relpath(path, base)

    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")  # same folder: the rename is atomic
    try:
        with open(tmp, "x", newline="", encoding="utf-8") as fh:  # "x": never another's file
            writer = csv.writer(fh)
            writer.writerow(HEADER)
            for r in recipe.rows:
                writer.writerow([r.id, r.label, r.split, ref(r.audio), ref(r.frames), ref(r.video)])
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, out)
    except FileExistsError as e:  # not ours: leave it
        raise BnfixError(f"{tmp.name} exists (another run writing?); remove it", out.parent) from e
    except BaseException as e:
        with contextlib.suppress(OSError):  # a cleanup failure must not hide the cause
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise BnfixError(f"cannot write: {e.strerror or e}", out) from e
        raise
    return out
