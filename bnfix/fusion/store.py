"""A feature store whose memory does not grow with the dataset: fixed-shape rows on disk.

One store holds one modality's features under one parameter set (fbank settings, frame count
and size, ...): a raw ``data.bin`` of equal-sized rows, read through ``numpy.memmap``, and an
append-only ``index.jsonl`` that says which sample's features sit in which row and what they
were computed from. Reading a batch touches only its rows: they come in as page cache, which
the kernel can reclaim and which every process reading the store (DataLoader workers, torchrun
ranks on one machine) shares, instead of each holding a private copy of the whole dataset.

Why this is safe to kill at any point: a row is written before its index line, and the index
is only ever appended to, one ``write`` per line. A process killed mid-row leaves a row no line
points to (it is simply written again); one killed mid-line leaves a torn last line, ignored on
reading (the next line starts on a fresh one). Growing the file to hold new rows keeps the old
bytes. A sample whose source changed is re-extracted into the row it already has (rows have one
fixed shape), and the later index line wins. Several processes that fill one store serialise on
``lock`` (``fcntl.flock``); rows are written by any process, index lines only by the holder.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bnfix.errors import BnfixError, one_line
from bnfix.jsonio import dumps

__all__ = ["STORE_VERSION", "FeatureStore", "Record", "Rows", "write_row"]

#: Bump when a row's layout or meaning changes; a store of another version is rebuilt.
STORE_VERSION = 1


@dataclass
class Record:
    """One sample's entry: where its features are and what they were computed from."""

    name: str  # stable entry name (hash of kind, source path and parameters)
    key: str  # what the features were computed from (source stats); another key = stale
    row: int
    frames: int = 0  # audio: real (unpadded) fbank frames; visual: frames held in the row
    error: str | None = None  # why the source cannot be read (then the row holds nothing)
    total: float = 0.0  # audio: sum of the real values, for streaming normalisation stats
    total_sq: float = 0.0  # ... and of their squares
    count: int = 0  # ... and how many there are
    aspect: float = 1.0  # visual: the source frame's width / height (the row holds squares)


def write_row(data_path: Path, row: int, array: np.ndarray) -> None:
    """Write one row at its offset; callable from any process (no shared state but the file)."""
    flat = np.ascontiguousarray(array).view(np.uint8).reshape(-1)
    fd = os.open(data_path, os.O_WRONLY)
    try:
        offset = row * flat.size
        view = memoryview(flat)
        while view:
            written = os.pwrite(fd, view, offset)
            view, offset = view[written:], offset + written
    finally:
        os.close(fd)


class FeatureStore:
    """Rows of shape ``shape`` and dtype ``dtype`` in ``folder``, with their index."""

    def __init__(
        self, folder: Path, shape: tuple[int, ...], dtype: str, params: dict[str, object]
    ) -> None:
        self.folder = Path(folder)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.row_bytes = int(np.prod(self.shape)) * self.dtype.itemsize
        self.data_path = self.folder / "data.bin"
        self.index_path = self.folder / "index.jsonl"
        meta = {"version": STORE_VERSION, "shape": list(self.shape), "dtype": self.dtype.str}
        meta["params"] = params
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._open(meta)
        except OSError as e:
            raise BnfixError(f"cannot use the feature store: {one_line(e)}", self.folder) from e
        self.records = self._read_index()

    def _open(self, meta: dict[str, object]) -> None:
        """Create the files, or start over if the folder holds another layout."""
        meta_path = self.folder / "meta.json"
        text = dumps(meta, indent=1)
        found = meta_path.read_text() if meta_path.exists() else None
        if found is not None and found != text:
            for path in (self.data_path, self.index_path):
                path.unlink(missing_ok=True)
        if found != text:
            tmp = meta_path.with_name(f".meta.{os.getpid()}.tmp")
            tmp.write_text(text)
            os.replace(tmp, meta_path)
        self.data_path.touch(exist_ok=True)
        self.index_path.touch(exist_ok=True)

    def _read_index(self) -> dict[str, Record]:
        records: dict[str, Record] = {}
        self._torn = False
        with open(self.index_path, "rb") as fh:
            for line in fh:
                if not line.endswith(b"\n"):
                    self._torn = True  # by a kill: its row is simply extracted again
                    break
                try:
                    record = Record(**json.loads(line))
                except (ValueError, TypeError):
                    continue
                records[record.name] = record
            self._index_bytes = fh.tell()
        rows = self.capacity
        return {n: r for n, r in records.items() if r.error is not None or r.row < rows}

    # --- writing -----------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return os.path.getsize(self.data_path) // self.row_bytes if self.row_bytes else 0

    @contextmanager
    def locked(self, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
        """Hold the store for filling: concurrent runs on one cache take turns. ``on_wait``
        is called once if another holder makes this one wait (so a run says why it is idle)."""
        with open(self.folder / "lock", "a") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_wait is not None:
                    on_wait()
                fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                if os.path.getsize(self.index_path) != self._index_bytes:
                    self.records = self._read_index()  # what another holder added meanwhile
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def allocate(self, names: Sequence[str]) -> dict[str, int]:
        """A row for each name: its own if it has one, else a new one at the end."""
        rows: dict[str, int] = {}
        used = {r.row for r in self.records.values() if r.error is None}
        next_row = max(used, default=-1) + 1
        for name in names:
            old = self.records.get(name)
            if old is not None and old.error is None:
                rows[name] = old.row
            else:
                rows[name] = next_row
                next_row += 1
        if next_row > self.capacity:
            try:
                with open(self.data_path, "r+b") as fh:
                    fh.truncate(next_row * self.row_bytes)  # sparse: costs nothing until written
            except OSError as e:
                raise BnfixError(
                    f"cannot grow the feature store: {one_line(e)}", self.folder
                ) from e
        return rows

    def commit(self, records: Sequence[Record]) -> None:
        """Append index lines for rows already written (one write per line: kill-safe)."""
        if not records:
            return
        try:
            with open(self.index_path, "a", encoding="utf-8") as fh:
                if self._torn:  # end the torn line first, or the next line would join it
                    fh.write("\n")
                    self._torn = False
                for record in records:
                    fh.write(dumps(asdict(record)) + "\n")
                    fh.flush()
                    self.records[record.name] = record
                self._index_bytes = fh.tell()
        except OSError as e:
            raise BnfixError(f"cannot write the feature store: {one_line(e)}", self.folder) from e

    # --- reading -----------------------------------------------------------------------------

    def fresh(self, name: str, key: str) -> Record | None:
        """The record of ``name`` if it was computed from exactly ``key``."""
        record = self.records.get(name)
        return record if record is not None and key and record.key == key else None

    def array(self) -> np.ndarray:
        """Every row, memory-mapped read-only: ``[capacity, *shape]`` (no copy, no read yet)."""
        rows = self.capacity
        if rows == 0:
            return np.empty((0, *self.shape), dtype=self.dtype)
        return np.memmap(self.data_path, dtype=self.dtype, mode="r", shape=(rows, *self.shape))


class Rows:
    """Some rows of a store in sample order, read as torch tensors when indexed.

    ``rows[i]`` (an int, a slice, an index list or tensor, optionally followed by more indices
    as in ``rows[i, 0, :n]``) reads just those rows from the memory map, in file order, and
    passes them through ``convert`` (for audio: the normalisation, which belongs to the run and
    not to the store). Nothing is read when a Rows is made or pickled to a DataLoader worker.
    """

    def __init__(self, array: np.ndarray, rows: np.ndarray, convert: Any = None) -> None:
        self.array = array
        self.rows = np.asarray(rows, dtype=np.int64)
        self.convert = convert

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (to spawned DataLoader workers) as the file to map, never as the data."""
        state = dict(self.__dict__)
        if isinstance(self.array, np.memmap) and self.array.filename:
            a = self.array
            state["array"] = ("memmap", a.filename, a.dtype.str, a.shape)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if isinstance(state["array"], tuple):
            _, filename, dtype, shape = state["array"]
            state["array"] = np.memmap(filename, dtype=np.dtype(dtype), mode="r", shape=shape)
        self.__dict__.update(state)

    @property
    def shape(self) -> tuple[int, ...]:
        """As a tensor of every row would have it (converted: audio gains its channel axis)."""
        return (len(self), *self._converted_row().shape[1:])

    @property
    def dtype(self) -> torch.dtype:
        return self._converted_row().dtype

    def _converted_row(self) -> torch.Tensor:
        """One zero row through ``convert``: what a read row turns into, without reading one."""
        return self.to_tensor(np.zeros((1, *self.array.shape[1:]), dtype=self.array.dtype))

    def read(self, rows: np.ndarray, frames: np.ndarray | None = None) -> np.ndarray:
        """Store rows ``rows`` (and only ``frames[b]`` of row b along its first axis), in the
        asked order: each row is copied straight to its place, visited in file order (a store
        on disk is read forward; one copy, no second pass to unsort)."""
        rows = np.asarray(rows)
        tail = self.array.shape[1:]
        if frames is not None:
            frames = np.asarray(frames)
            tail = (frames.shape[1], *tail[1:])
        out = np.empty((len(rows), *tail), dtype=self.array.dtype)
        for j in np.argsort(rows, kind="stable"):
            out[j] = self.array[rows[j]] if frames is None else self.array[rows[j], frames[j]]
        return out

    def take(self, index: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """Samples ``index`` (positions, as for indexing), of each only the stored frames
        ``frames[b]`` (along the row's first axis): ``[B, len(frames[b]), ...]``."""
        picked = self.rows[index.numpy()]
        return self.to_tensor(self.read(picked, frames.numpy()))

    def __getitem__(self, index: Any) -> torch.Tensor:
        first, rest = (index[0], index[1:]) if isinstance(index, tuple) else (index, ())
        if isinstance(first, torch.Tensor):
            first = first.numpy()
        picked = self.rows[first]
        single = np.ndim(picked) == 0
        tensor = self.to_tensor(self.read(np.atleast_1d(picked)))
        if single:
            return tensor[0][rest] if rest else tensor[0]
        return tensor[(slice(None), *rest)] if rest else tensor

    def to_tensor(self, data: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(np.ascontiguousarray(data))
        return self.convert(tensor) if self.convert is not None else tensor
