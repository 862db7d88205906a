"""A manifest's features, extracted once into memory-mapped stores and read batch by batch.

Decoding a 10 s clip and computing its 1024-frame fbank, or decoding three video frames, costs
far more than one training step can wait for; FusT reads every sample in every epoch of two
stages, usually over several runs. So each sample's features are computed once, on worker
processes (:mod:`bnfix.fusion.extract`), into fixed-shape rows of a
:class:`~bnfix.fusion.store.FeatureStore` under ``cache_dir/store/``: one store per modality and
feature-parameter set, so different parameters live side by side. A run then holds no feature
in its own memory: :class:`FeatureSet` gives :class:`~bnfix.fusion.store.Rows` views that read a
batch's rows when indexed (page cache, shared by DataLoader workers and torchrun ranks).

What each modality computes and stores lives in :mod:`bnfix.fusion.kinds`; this module finds
what is missing or stale, has it extracted, and assembles the :class:`FeatureSet`.

- A sample's entry name is a hash of what it *is* (kind, resolved source path, parameters); its
  key holds what it was computed *from* (the source's size and mtime_ns, and for a frame folder
  the count of frames and each picked frame's name, size and mtime_ns). A changed source no
  longer matches and is re-extracted alone, into its own row.
- Audio rows hold the raw log-mel fbank, zero-padded to ``target_frames`` (the padding is the
  normalised log-mel zero after normalisation, as in AST); the normalisation
  ``(x - mean) / (2 std)`` is applied when a batch is read, since the statistics belong to the
  run's training split. They are streamed: each record keeps its sample's sum, sum of squares
  and count, so the training split's mean and std need no second pass over the data.
- Visual rows hold uint8 frames (:class:`VisualOptions` says which and how); cropping,
  flipping and normalising happen on batches (:mod:`bnfix.fusion.augment`).
- Files that cannot be decoded (a video without an audio track, a truncated file, ...) are
  recorded as such too, with their reason, reported by id and skipped, never silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rich.console
import torch
from rich.markup import escape

from bnfix.errors import BnfixError
from bnfix.fusion.extract import SAMPLE_TIMEOUT, Job, default_workers, extract
from bnfix.fusion.kinds import (
    CACHE_VERSION,
    AudioKind,
    Kind,
    VisualKind,
    VisualOptions,
    decode_frame,
    decode_image,
    frame_files,
    frame_indices,
)
from bnfix.fusion.manifest import Manifest, Sample
from bnfix.fusion.store import FeatureStore, Rows
from bnfix.probe_audio import AudioOptions

__all__ = [
    "CACHE_VERSION", "FeatureSet", "VisualOptions", "decode_frame", "decode_image", "frame_files",
    "frame_indices", "load_features",
]  # fmt: skip

#: Skipped samples listed one by one on the console; the rest are counted.
SHOW_SKIPPED = 20


@dataclass
class FeatureSet:
    ids: list[str]
    labels: torch.Tensor  # int64 [N]
    splits: list[str]  # per sample
    #: float32 [N, 1, target_frames, mel_bins], normalised when read. None without audio.
    audio: Rows | None
    #: uint8 [N, F, 3, S, S] when read: F = T (sampling "middle") or max_frames ("random").
    visual: Rows | None
    skipped: list[tuple[str, str]]  # (id, reason) of unreadable samples, also printed
    classes: list[str]
    computed: int = 0  # entries (sample x modality) extracted by this call
    cached: int = 0  # entries found in the store
    #: The audio normalisation ``(x - mean) / (2 std)`` applied (given, or from the train split):
    #: the inputs an exported audio encoder expects. None without audio.
    audio_mean: float | None = None
    audio_std: float | None = None
    visual_options: VisualOptions | None = None
    visual_frames: torch.Tensor | None = None  # int64 [N]: frames held per row (F or fewer)
    visual_aspect: torch.Tensor | None = None  # float32 [N]: source width / height

    def indices(self, split: str) -> torch.Tensor:
        """Positions of one split's samples, int64 (empty for a split the data lacks)."""
        return torch.tensor([i for i, s in enumerate(self.splits) if s == split], dtype=torch.int64)


def load_features(
    manifest: Manifest,
    audio: AudioOptions,
    visual: VisualOptions,
    cache_dir: Path,
    console: rich.console.Console | None = None,
    modalities: tuple[str, ...] | None = None,
    workers: int | None = None,
    sample_timeout: float = SAMPLE_TIMEOUT,
) -> FeatureSet:
    """Features of every sample of ``manifest``, extracted where the store lacks them.

    ``modalities`` (default: the manifest's) picks what to load; a sample missing any of them is
    skipped. Audio statistics come from the kept training samples unless ``audio.mean`` and
    ``audio.std`` are given (use the same ones at test time as at training time). ``workers``:
    extraction processes (default: the cores this process may use); on more than one, a sample
    still computing after ``sample_timeout`` seconds is skipped as stuck.
    """
    console = console or rich.console.Console(stderr=True)
    wanted = _check_modalities(manifest, modalities)
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise BnfixError(f"data.workers must be at least 1 (got {workers})")
    cache_dir = Path(cache_dir).expanduser()
    kinds: dict[str, Kind] = {"audio": AudioKind(audio), "visual": VisualKind(visual)}
    records: dict[str, list[Any]] = {}
    stores: dict[str, FeatureStore] = {}
    computed = cached = 0
    for m in wanted:
        stores[m] = kinds[m].store(cache_dir)
        records[m], fresh = _fill(
            kinds[m], stores[m], manifest.samples, workers, console, sample_timeout
        )
        computed += fresh
        cached += len(manifest.samples) - fresh
    if computed:
        console.print(
            f"features: {computed} extracted, {cached} read from the store "
            f"({escape(str(cache_dir))})"
        )
    _note_old_cache(cache_dir, console)
    keep, skipped = _keep_readable(manifest.samples, records, wanted)
    _report_skipped(skipped, len(manifest.samples), console)
    kept = [manifest.samples[i] for i in keep]
    if not any(s.split == "train" for s in kept):
        first = f" (first: {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
        raise BnfixError(
            f"no readable training sample: all {sum(s.split == 'train' for s in manifest.samples)}"
            f" were skipped{first}; fix or remove the unreadable files",
            manifest.path,
        )
    result = FeatureSet(
        ids=[s.id for s in kept],
        labels=torch.tensor([s.label for s in kept], dtype=torch.int64),
        splits=[s.split for s in kept],
        audio=None,
        visual=None,
        skipped=skipped,
        classes=list(manifest.classes),
        computed=computed,
        cached=cached,
    )
    if "audio" in wanted:
        chosen = [records["audio"][i] for i in keep]
        mean, std = _audio_stats(kept, chosen, audio)
        result.audio = Rows(
            stores["audio"].array(),
            np.array([r.row for r in chosen]),
            _Normalise(mean, std),
        )
        result.audio_mean, result.audio_std = mean, std
    if "visual" in wanted:
        chosen = [records["visual"][i] for i in keep]
        result.visual = Rows(stores["visual"].array(), np.array([r.row for r in chosen]))
        result.visual_options = visual
        result.visual_frames = torch.tensor([r.frames for r in chosen], dtype=torch.int64)
        result.visual_aspect = torch.tensor([r.aspect for r in chosen], dtype=torch.float32)
    return result


def _check_modalities(manifest: Manifest, modalities: tuple[str, ...] | None) -> tuple[str, ...]:
    if modalities is None:
        return manifest.modalities
    for m in modalities:
        if m not in ("audio", "visual"):
            raise BnfixError(f"unknown modality {m!r}; use 'audio' or 'visual'")
        if m not in manifest.modalities:
            column = "audio" if m == "audio" else "frames"
            raise BnfixError(
                f"the manifest has no {m} data (column {column!r} or 'video' missing or empty)",
                manifest.path,
            )
    if not modalities:
        raise BnfixError("no modality to load")
    return tuple(m for m in ("audio", "visual") if m in modalities)


class _Normalise:
    """Raw fbank rows ``[B, T, M]`` -> normalised ``[B, 1, T, M]`` (picklable for workers)."""

    def __init__(self, mean: float, std: float) -> None:
        self.mean, self.std = mean, std

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # In place: ``x`` is the batch just read, nobody else's (one pass, no temporaries).
        return x.sub_(self.mean).div_(2.0 * self.std).unsqueeze(1)


# --- filling the stores ------------------------------------------------------------------------


def _fill(
    kind: Kind,
    store: FeatureStore,
    samples: list[Sample],
    workers: int,
    console: rich.console.Console,
    sample_timeout: float,
) -> tuple[list[Any], int]:
    """Every sample's record for one modality, and how many had to be extracted."""
    entries = [kind.entry(s) for s in samples]

    def waiting() -> None:
        console.print(
            f"{kind.kind}: waiting for another run filling the same feature store ({store.folder})",
            highlight=False,
        )

    with store.locked(on_wait=waiting):
        missing = [e for e in entries if store.fresh(e.name, e.key) is None]
        rows = store.allocate([e.name for e in missing if e.error is None])
        jobs = [Job(e.name, e.key, e.source, rows.get(e.name, -1), e.error) for e in missing]
        extract(kind, store, jobs, workers, console, sample_timeout)
    records = [store.records[e.name] for e in entries]
    return records, len(missing)


def _note_old_cache(cache_dir: Path, console: rich.console.Console) -> None:
    """Earlier versions kept one safetensors file per sample in ``audio/`` and ``visual/``;
    nothing reads them now. Say so once per run, with the space they hold."""
    old = [d for d in (cache_dir / "audio", cache_dir / "visual") if d.is_dir()]
    files = [f for d in old for f in d.glob("*.safetensors")]
    if files:
        size = sum(f.stat().st_size for f in files) / 2**20
        folders = " and ".join(escape(str(d)) for d in old)
        console.print(
            f"note: {folders} hold {len(files)} files ({size:.0f} MiB) of the per-sample "
            "cache of earlier bnfix versions, no longer read: delete them to free the space",
            highlight=False,
        )


# --- assembling the FeatureSet -----------------------------------------------------------------


def _keep_readable(
    samples: list[Sample], records: dict[str, list[Any]], wanted: tuple[str, ...]
) -> tuple[list[int], list[tuple[str, str]]]:
    keep: list[int] = []
    skipped: list[tuple[str, str]] = []
    for i, sample in enumerate(samples):
        reasons = [f"{m}: {records[m][i].error}" for m in wanted if records[m][i].error]
        if reasons:
            skipped.append((sample.id, "; ".join(reasons)))
        else:
            keep.append(i)
    return keep, skipped


def _report_skipped(
    skipped: list[tuple[str, str]], total: int, console: rich.console.Console
) -> None:
    if not skipped:
        return
    console.print(
        f"[yellow]warning:[/] skipped {len(skipped)} of {total} samples that cannot be read:"
    )
    for sample_id, reason in skipped[:SHOW_SKIPPED]:
        console.print(f"  {escape(sample_id)}: {escape(reason)}", soft_wrap=True)
    if len(skipped) > SHOW_SKIPPED:
        console.print(f"  ... and {len(skipped) - SHOW_SKIPPED} more")


def _audio_stats(kept: list[Sample], records: list[Any], opts: AudioOptions) -> tuple[float, float]:
    """The mean and std of ``(x - mean) / (2 std)``: given, or from the training split.

    Missing statistics come from the real (unpadded) frames of the training samples only:
    validation and test data must not leak into the input normalisation. Summed from each
    record's totals in float64: no pass over the features.
    """
    mean, std = opts.mean, opts.std
    if mean is not None and std is not None:
        return float(mean), float(std)
    total = total_sq = 0.0
    count = 0
    for sample, record in zip(kept, records, strict=True):
        if sample.split == "train":
            total += record.total
            total_sq += record.total_sq
            count += record.count
    train_mean, train_std = 0.0, 1.0
    if count:
        train_mean = total / count
        spread = max(total_sq / count - train_mean * train_mean, 0.0) ** 0.5
        train_std = spread if spread > 1e-6 else 1.0  # an all-silent set: no spread to divide by
    return float(train_mean if mean is None else mean), float(train_std if std is None else std)
