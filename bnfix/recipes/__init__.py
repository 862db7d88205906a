"""Dataset recipes: turn a public dataset's own layout into a fusion manifest.

``build(fmt, root, **options)`` reads only names (folders, file names, the dataset's list
files) and gives a :class:`Recipe`: the rows, and the listed clips whose files are missing.
:func:`write_manifest` writes it atomically. ``bnfix manifest FORMAT ROOT`` is a thin layer
over the two. Formats: ``ks`` (Kinetics-Sounds, the FusT code's layout), ``cremad`` (split by
actor), ``ave``, ``vggsound`` and ``folders`` (``ROOT/<split>/<class>/<sample>``); each
module's docstring describes its layout and choices.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bnfix.errors import BnfixError
from bnfix.recipes import ave, cremad, folders, ks, vggsound
from bnfix.recipes.common import SPLITS, Recipe, Row, check_out, recording_reads, write_manifest

__all__ = [
    "FORMATS",
    "Recipe",
    "Row",
    "build",
    "check_out",
    "describe_missing",
    "report",
    "write_manifest",
]

#: Format name -> builder ``(root, **options) -> Recipe``.
FORMATS: dict[str, Callable[..., Recipe]] = {
    "ks": ks.build,
    "cremad": cremad.build,
    "ave": ave.build,
    "vggsound": vggsound.build,
    "folders": folders.build,
}
#: How many missing clips a report or an error line names before "..." (the count is exact).
SHOW_MISSING = 5
#: Above this many classes the report gives per-class extremes instead of one line per class.
TABLE_CLASSES = 40


def build(fmt: str, root: str | Path, *, strict: bool = False, **options: object) -> Recipe:
    """The recipe for ``root`` laid out as ``fmt``; ``options`` are the format's own.

    ``strict``: listed clips without their files are an error rather than left out. A recipe
    with no training row is always an error (no manifest could be trained on).
    """
    if fmt not in FORMATS:
        raise BnfixError(f"unknown dataset format {fmt!r}; use one of {', '.join(FORMATS)}")
    builder = FORMATS[fmt]
    accepted = set(inspect.signature(builder).parameters) - {"root"}
    for name in options:
        if name not in accepted:
            raise BnfixError(f"--{name.replace('_', '-')} does not apply to the {fmt} format")
    with recording_reads() as read:  # the dataset's list files: never a manifest's --out
        recipe = builder(Path(root).expanduser(), **options)
    recipe.inputs.extend(p for p in read if p not in recipe.inputs)
    if recipe.missing and strict:
        raise BnfixError(f"{describe_missing(recipe)} (--strict: nothing written)", root)
    if not any(r.split == "train" for r in recipe.rows):
        lacking = f"; {describe_missing(recipe)}" if recipe.missing else ""
        raise BnfixError(f"no training clip with its files found{lacking}", root)
    return recipe


def describe_missing(recipe: Recipe, show: int = SHOW_MISSING) -> str:
    """``N listed clips lack their files (first: id (why), ...)``: one line however many."""
    first = ", ".join(f"{i} ({why})" for i, why in recipe.missing[:show])
    more = ", ..." if len(recipe.missing) > show else ""
    n = len(recipe.missing)
    clips = "1 listed clip lacks its" if n == 1 else f"{n} listed clips lack their"
    return f"{clips} files (first: {first}{more})"


def report(recipe: Recipe, console: Console) -> None:
    """Notes, missing clips, and clips per class and split, as the CLI prints them."""
    for note in recipe.notes:
        console.print(f"note: {note}", highlight=False)
    if recipe.missing:
        console.print(f"missing: {describe_missing(recipe)}", highlight=False)
    counts = recipe.counts()
    splits = recipe.split_counts()
    used = [s for s in SPLITS if splits[s]]
    if len(counts) <= TABLE_CLASSES:
        table = Table("class", *used, "total", title=f"{recipe.format}: clips per class")
        for label, per in counts.items():
            table.add_row(label, *(str(per[s]) for s in used), str(sum(per.values())))
        table.add_section()
        table.add_row("all", *(str(splits[s]) for s in used), str(len(recipe.rows)))
        console.print(table)
    else:
        totals = sorted((sum(per.values()), label) for label, per in counts.items())
        console.print(
            f"{len(counts)} classes; clips per class: min {totals[0][0]} ({totals[0][1]}), "
            f"median {totals[len(totals) // 2][0]}, max {totals[-1][0]} ({totals[-1][1]})",
            highlight=False,
        )
    per_split = ", ".join(f"{s} {splits[s]}" for s in used)
    console.print(
        f"{len(recipe.rows)} clips ({per_split}) in {len(counts)} classes", highlight=False
    )
