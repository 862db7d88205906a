"""TensorBoard curves of a fusion-tune run: every per-epoch scalar of ``metrics.jsonl``.

With ``run.tensorboard = true`` each metrics record is mirrored into ``<out_dir>/tensorboard/``
(with ``run.seeds``: each seed's folder has its own). One scalar per numeric leaf of the record,
tagged ``<phase>/<key path joined by '/'>`` (``stage1/audio/train_loss``,
``stage2-none/val_acc_visual``), at step = the record's 1-based epoch. The record's identifiers
(``phase``, ``stage``, ``epoch``) are the tag and the step, not curves; strings and missing
values (``null``: no validation split) have no curve either.

The folder is a mirror of ``metrics.jsonl`` that a continued run extends without duplicates:
when the log opens it reads back every ``(tag, step)`` already in the folder's event files
(tensorboard's own reader), writes the records of ``metrics.jsonl`` that are missing there (the
extra turned on for a resumed run, an epoch killed before its flush), and from then on writes
no pair twice. A run killed between an epoch's metrics line and its checkpoint replays that
epoch on ``--resume`` (``RunDir.trim_metrics`` drops the orphaned line); the replay gives the
same numbers on the CPU, so its points are already there and are skipped. A resumed run opens
a new event file in the same folder: TensorBoard shows the files of one folder as one run.

The ``tensorboard`` package is an optional extra (``pip install 'bnfix[tensorboard]'``); asking
for the curves without it is refused before anything is written (:func:`require`).
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from bnfix.errors import BnfixError, one_line

__all__ = ["FOLDER", "ScalarLog", "read_points", "require", "scalars"]

#: The log's folder inside a run's out_dir.
FOLDER = "tensorboard"
#: Record keys that identify a record (its tag prefix and step) rather than measure it.
IDENTIFIERS = ("phase", "stage", "epoch")
EVENT_GLOB = "events.out.tfevents.*"


def require() -> None:
    """Refuse ``run.tensorboard = true`` when the extra is missing (one line, nothing made)."""
    if importlib.util.find_spec("tensorboard") is None:
        raise BnfixError(
            "run.tensorboard = true needs the tensorboard package: pip install "
            "'bnfix[tensorboard]' (or set run.tensorboard = false)"
        )


def scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """``{tag: value}`` for every numeric leaf of one metrics record (booleans are not numbers
    here: a flag is not a curve)."""
    phase = str(record["phase"])
    out: dict[str, float] = {}
    for path, value in _leaves({k: v for k, v in record.items() if k not in IDENTIFIERS}):
        if isinstance(value, int | float) and not isinstance(value, bool):
            out["/".join((phase, *path))] = float(value)
    return out


def _leaves(tree: Any, path: tuple[str, ...] = ()) -> Iterable[tuple[tuple[str, ...], Any]]:
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            yield from _leaves(value, (*path, str(key)))
    elif isinstance(tree, list | tuple):
        for i, value in enumerate(tree):
            yield from _leaves(value, (*path, str(i)))
    else:
        yield path, tree


def read_points(folder: Path) -> dict[tuple[str, int], list[float]]:
    """Every scalar point in the folder's event files: ``(tag, step) -> values`` (one value per
    time it was written, in file-name order: more than one means a duplicate).

    A record cut short at the end of a file (a killed writer) ends that file's reading.
    """
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    points: dict[tuple[str, int], list[float]] = {}
    for path in sorted(folder.glob(EVENT_GLOB)) if folder.is_dir() else ():
        for event in LegacyEventFileLoader(str(path)).Load():
            for value in event.summary.value:
                number = value.simple_value if value.HasField("simple_value") else math.nan
                points.setdefault((value.tag, int(event.step)), []).append(number)
    return points


class ScalarLog:
    """The run's TensorBoard writer (main rank only): each ``(tag, step)`` written once."""

    def __init__(self, folder: Path, records: Iterable[Mapping[str, Any]] = ()) -> None:
        """Open ``folder`` (created), then write the ``records`` (metrics.jsonl so far) that
        the folder does not hold yet."""
        require()
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # installed but broken (a protobuf mismatch, say)
            raise BnfixError(f"run.tensorboard: cannot use tensorboard: {one_line(exc)}") from None
        self.folder = folder
        self.written: set[tuple[str, int]] = set(read_points(folder))
        self._writer = SummaryWriter(log_dir=str(folder))
        for record in records:
            self._add(record)
        self._writer.flush()

    def write(self, record: Mapping[str, Any]) -> int:
        """Add one epoch's record and flush it to disk; returns the points written."""
        count = self._add(record)
        self._writer.flush()
        return count

    def _add(self, record: Mapping[str, Any]) -> int:
        step = int(record["epoch"])
        count = 0
        for tag, value in scalars(record).items():
            if (tag, step) in self.written:
                continue
            self._writer.add_scalar(tag, value, global_step=step)
            self.written.add((tag, step))
            count += 1
        return count

    def close(self) -> None:
        self._writer.close()
