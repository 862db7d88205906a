"""Decoded features of a manifest, computed once and cached on disk.

Decoding a 10 s clip and computing its 1024-frame fbank, or decoding and resizing three JPEG
frames, costs far more than one training step needs to wait for; FusT reads every sample in
every epoch of two stages, and usually over several runs. So each sample's features are computed
once and stored in ``cache_dir``, one safetensors file per sample and modality:

- the file name is a hash of what the entry *is* (kind, resolved source path, feature
  parameters), so different parameters live side by side;
- the file's metadata holds what it was computed *from* (the source's size and mtime_ns, and for
  a frame folder the count of frames and each picked frame's name, size and mtime_ns); a changed
  source no longer matches and is recomputed in place, without leaving stale files behind;
- writes are atomic (temporary file + rename), so concurrent runs or DDP ranks filling the same
  cache, or a run killed mid-write, never leave a half-written entry; an entry that cannot be
  read back for any reason is simply recomputed.

Audio is cached as its unpadded log-mel fbank (float32) and normalised at load time, since the
statistics belong to the training split, not to one file. Frames are cached as uint8 squares of
``S = round(size * 8 / 7)`` pixels; cropping, flipping and normalising happen on batches
(:mod:`bnfix.fusion.augment`). Files that cannot be decoded are cached as such too (with their
reason), reported by id and skipped, never silently.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import rich.console
import torch
from rich.markup import escape
from safetensors import safe_open
from safetensors.torch import save as safetensors_save

from bnfix.checkpoint import write_atomic
from bnfix.errors import BnfixError, one_line
from bnfix.fusion.manifest import Manifest, Sample
from bnfix.probe import IMAGE_EXTENSIONS
from bnfix.probe_audio import AudioOptions, features_with_length, read_audio

__all__ = ["CACHE_VERSION", "FeatureSet", "VisualOptions", "load_features"]

#: Bump when what an entry holds changes meaning, so that old caches are recomputed.
CACHE_VERSION = 2  # 2: frames decoded by probe_image.decode_rgb (16-bit scaled)
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".webm")
#: Skipped samples listed one by one on the console; the rest are counted.
SHOW_SKIPPED = 20


@dataclass(frozen=True)
class VisualOptions:
    frames: int = 3  # frames per sample, evenly spaced over the folder's sorted frames
    size: int = 224  # training crop; cached frames are S = round(size*8/7) squares, uint8

    def __post_init__(self) -> None:
        if self.frames < 1:
            raise BnfixError(f"visual frames must be at least 1 (got {self.frames})")
        if self.size < 1:
            raise BnfixError(f"visual size must be at least 1 (got {self.size})")

    @property
    def stored_size(self) -> int:
        """Side of the cached squares: the ImageNet resize-before-crop ratio (256 for 224)."""
        return round(self.size * 8 / 7)


@dataclass
class FeatureSet:
    ids: list[str]
    labels: torch.Tensor  # int64 [N]
    splits: list[str]  # per sample
    audio: torch.Tensor | None  # float32 [N, 1, target_frames, mel_bins], normalised
    visual: torch.Tensor | None  # uint8 [N, T, 3, S, S]
    skipped: list[tuple[str, str]]  # (id, reason) of unreadable samples, also printed
    classes: list[str]
    computed: int = 0  # cache entries (sample x modality) computed by this call
    cached: int = 0  # cache entries read back from the cache
    #: The audio normalisation ``(x - mean) / (2 std)`` applied (given, or from the train split):
    #: the inputs an exported audio encoder expects. None without audio.
    audio_mean: float | None = None
    audio_std: float | None = None

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
) -> FeatureSet:
    """Features of every sample of ``manifest``, from the cache where it is up to date.

    ``modalities`` (default: the manifest's) picks what to load; a sample missing any of them is
    skipped. Audio statistics come from the kept training samples unless ``audio.mean`` and
    ``audio.std`` are given (use the same ones at test time as at training time).
    """
    console = console or rich.console.Console(stderr=True)
    wanted = _check_modalities(manifest, modalities)
    cache_dir = Path(cache_dir).expanduser()
    kinds = {
        "audio": _AudioKind(audio, cache_dir / "audio"),
        "visual": _VisualKind(visual, cache_dir / "visual"),
    }
    for m in wanted:
        try:
            kinds[m].folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BnfixError(
                f"cannot create the feature cache folder: {one_line(e)}", cache_dir
            ) from e
    results: dict[str, list[_Result]] = {}
    computed = cached = 0
    for m in wanted:
        results[m], fresh = _load_kind(kinds[m], manifest.samples, console)
        computed += fresh
        cached += len(manifest.samples) - fresh
    if computed:
        console.print(
            f"features: {computed} computed, {cached} read from the cache "
            f"({escape(str(cache_dir))})"
        )
    keep, skipped = _keep_readable(manifest.samples, results, wanted)
    _report_skipped(skipped, len(manifest.samples), console)
    kept = [manifest.samples[i] for i in keep]
    if not any(s.split == "train" for s in kept):
        first = f" (first: {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
        raise BnfixError(
            f"no readable training sample: all {sum(s.split == 'train' for s in manifest.samples)}"
            f" were skipped{first}; fix or remove the unreadable files",
            manifest.path,
        )
    stacked, mean, std = None, None, None
    if "audio" in wanted:
        stacked, mean, std = _stack_audio(kept, [results["audio"][i] for i in keep], audio)
    return FeatureSet(
        ids=[s.id for s in kept],
        labels=torch.tensor([s.label for s in kept], dtype=torch.int64),
        splits=[s.split for s in kept],
        audio=stacked,
        visual=_stack_visual([results["visual"][i] for i in keep], visual)
        if "visual" in wanted
        else None,
        skipped=skipped,
        classes=list(manifest.classes),
        computed=computed,
        cached=cached,
        audio_mean=mean,
        audio_std=std,
    )


def _check_modalities(manifest: Manifest, modalities: tuple[str, ...] | None) -> tuple[str, ...]:
    if modalities is None:
        return manifest.modalities
    for m in modalities:
        if m not in ("audio", "visual"):
            raise BnfixError(f"unknown modality {m!r}; use 'audio' or 'visual'")
        if m not in manifest.modalities:
            column = "audio" if m == "audio" else "frames"
            raise BnfixError(
                f"the manifest has no {m} data (column {column!r} missing or empty)",
                manifest.path,
            )
    if not modalities:
        raise BnfixError("no modality to load")
    return tuple(m for m in ("audio", "visual") if m in modalities)


# --- one cache entry ---------------------------------------------------------------------------


@dataclass
class _Result:
    """One sample's features of one modality, or why there are none."""

    tensor: torch.Tensor | None = None
    frames: int = 0  # audio: real (unpadded) fbank frames
    error: str | None = None


@dataclass
class _Entry:
    name: str  # cache file stem: hash of kind, source and parameters
    key: str  # JSON of everything the features depend on, stored in the file
    source: Path
    picked: list[Path] = field(default_factory=list)  # visual: the frame files to decode
    error: str | None = None  # the source could not even be listed or stat'ed


class _Kind:
    """What differs between the audio and the visual cache: keys, computing, payloads."""

    kind: str
    folder: Path

    def params(self) -> dict[str, object]:
        raise NotImplementedError

    def source(self, sample: Sample) -> Path:
        raise NotImplementedError

    def describe(self, source: Path) -> tuple[dict[str, object], list[Path]]:
        """What the entry is computed from (stat data), and the files to decode."""
        st = source.stat()
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}, [source]

    def compute(self, entry: _Entry) -> _Result:
        raise NotImplementedError

    def prepare(self) -> None:
        """Import the decoders in the calling thread.

        torchaudio and torchvision are imported lazily (they cost ~1 s); importing them from
        several worker threads at once trips over torchaudio's circular imports.
        """

    def entry(self, sample: Sample) -> _Entry:
        source = self.source(sample).resolve()
        identity = {"v": CACHE_VERSION, "kind": self.kind, "path": str(source)}
        identity["params"] = self.params()
        name = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:40]
        try:
            stat, picked = self.describe(source)
        except BnfixError as e:  # no key: never a hit, never cached (describing is cheap)
            return _Entry(name, "", source, error=one_line(e))
        except OSError as e:  # vanished or unreadable since the manifest was read
            return _Entry(name, "", source, error=f"cannot read: {one_line(e)}")
        key = json.dumps({**identity, "stat": stat}, sort_keys=True)
        return _Entry(name, key, source, picked)


class _AudioKind(_Kind):
    kind = "audio"

    def __init__(self, opts: AudioOptions, folder: Path) -> None:
        self.opts, self.folder = opts, folder

    def params(self) -> dict[str, object]:
        # mean/std are applied at load time, so they do not invalidate the cache.
        return {k: v for k, v in asdict(self.opts).items() if k not in ("mean", "std")}

    def source(self, sample: Sample) -> Path:
        assert sample.audio is not None
        return sample.audio

    def prepare(self) -> None:
        import torchaudio.compliance.kaldi
        import torchaudio.transforms  # noqa: F401

    def compute(self, entry: _Entry) -> _Result:
        wave, rate = read_audio(entry.source, self.opts)
        fbank, frames = features_with_length(wave, rate, self.opts)
        return _Result(fbank[:frames].contiguous(), frames)


class _VisualKind(_Kind):
    kind = "visual"

    def __init__(self, opts: VisualOptions, folder: Path) -> None:
        self.opts, self.folder = opts, folder

    def params(self) -> dict[str, object]:
        return {"frames": self.opts.frames, "stored_size": self.opts.stored_size}

    def source(self, sample: Sample) -> Path:
        assert sample.frames is not None
        return sample.frames

    def describe(self, source: Path) -> tuple[dict[str, object], list[Path]]:
        """For a folder: the frame count and the picked frames' stats, not every frame's.

        Which frames are picked depends only on the sorted names, so a frame added, removed or
        renamed changes the count or the picked names, and a picked frame rewritten changes its
        stat; a long 25 fps clip costs T stat calls, not hundreds.
        """
        if not source.is_dir():
            return super().describe(source)
        frames = frame_files(source)
        if not frames:
            raise BnfixError(
                f"no image frames ({', '.join(IMAGE_EXTENSIONS)}) in this folder",
            )
        picked = [frames[i] for i in frame_indices(len(frames), self.opts.frames)]
        stats = []
        for f in dict.fromkeys(picked):
            st = f.stat()
            stats.append([f.name, st.st_size, st.st_mtime_ns])
        return {"count": len(frames), "picked": stats}, picked

    def prepare(self) -> None:
        import torchvision.transforms.v2.functional  # noqa: F401

    def compute(self, entry: _Entry) -> _Result:
        side = self.opts.stored_size
        decoded = {f: decode_frame(f, side) for f in dict.fromkeys(entry.picked)}
        stack = [decoded[f] for f in entry.picked]
        if len(stack) == 1:
            stack *= self.opts.frames  # one image: a still clip of T identical frames
        return _Result(torch.stack(stack).contiguous())


def frame_indices(count: int, frames: int) -> list[int]:
    """``frames`` indices evenly spaced over ``count`` sorted frames: each segment's middle.

    The official code's evaluation pick (``i*seg + seg//2``), without its bug of never reaching
    the last frames when ``count`` is not a multiple; fewer frames than asked repeat frames.
    """
    return [min(count - 1, (2 * i + 1) * count // (2 * frames)) for i in range(frames)]


def _natural_key(path: Path) -> tuple[object, ...]:
    """``frame_2`` before ``frame_10``: extractors do not always zero-pad frame numbers."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path.name))


def frame_files(folder: Path) -> list[Path]:
    with os.scandir(folder) as it:
        names = [
            Path(e.path)
            for e in it
            if not e.name.startswith(".")
            and Path(e.name).suffix.lower() in IMAGE_EXTENSIONS
            and e.is_file()
        ]
    return sorted(names, key=_natural_key)


def decode_frame(path: Path, side: int) -> torch.Tensor:
    """RGB uint8 ``[3, side, side]``: shorter side resized to ``side``, centre-cropped.

    The same resize (on uint8, antialiased) and crop as the ImageNet pipeline in
    :mod:`bnfix.probe_image`, stopped before the float conversion so the cache stays uint8.
    """
    import torchvision.transforms.v2.functional as TF

    from bnfix.probe_image import ImageDecodeError, decode_rgb

    try:
        pixels = decode_rgb(path)  # the probes' decoder: 16-bit and float images scaled to 8 bits
    except ImageDecodeError as e:
        hint = ""
        if path.suffix.lower() in VIDEO_EXTENSIONS:
            hint = "; 'frames' must be a folder of extracted frames or one image, not a video"
        reason = e.reason if len(e.reason) <= 100 else e.reason[:100] + "…"
        raise BnfixError(f"cannot decode image {path.name}: {reason}{hint}") from e
    resized = TF.resize(pixels, [side], antialias=True)
    return TF.center_crop(resized, [side, side]).contiguous()


# --- reading and filling the cache -------------------------------------------------------------


def _read_entry(path: Path, key: str) -> _Result | None:
    """The cached result if ``path`` holds one for exactly ``key``; None otherwise."""
    if not key:
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("key") != key:
                return None
            if "error" in meta:
                return _Result(error=meta["error"])
            return _Result(f.get_tensor("x"), int(meta.get("frames", "0")))
    except Exception:  # missing, truncated, or from another safetensors version: recompute
        return None


def _write_entry(path: Path, key: str, result: _Result) -> None:
    meta = {"key": key}
    tensors: dict[str, torch.Tensor] = {}
    if result.error is not None:
        meta["error"] = result.error
    else:
        assert result.tensor is not None
        meta["frames"] = str(result.frames)
        tensors = {"x": result.tensor}
    try:
        write_atomic(path, safetensors_save(tensors, metadata=meta))
    except OSError as e:
        raise BnfixError(f"cannot write to the feature cache: {one_line(e)}", path.parent) from e


def _compute_entry(kind: _Kind, entry: _Entry) -> _Result:
    if entry.error is not None:
        return _Result(error=entry.error)
    try:
        result = kind.compute(entry)
    except BnfixError as e:  # readers raise path-less BnfixErrors for unusable files
        result = _Result(error=one_line(e))
    _write_entry(kind.folder / f"{entry.name}.safetensors", entry.key, result)
    return result


def _load_kind(
    kind: _Kind, samples: list[Sample], console: rich.console.Console
) -> tuple[list[_Result], int]:
    """Every sample's result for one modality, and how many had to be computed."""
    entries = [kind.entry(s) for s in samples]
    results: list[_Result | None] = [
        _read_entry(kind.folder / f"{e.name}.safetensors", e.key) for e in entries
    ]
    missing = [i for i, r in enumerate(results) if r is None]
    if missing:
        computed = _map(kind, [entries[i] for i in missing], console)
        for i, result in zip(missing, computed, strict=True):
            results[i] = result
    return [r for r in results if r is not None], len(missing)


def _map(kind: _Kind, entries: list[_Entry], console: rich.console.Console) -> list[_Result]:
    """Compute entries on a few threads, with a progress bar; results in order.

    libsndfile, Pillow and torch's fbank/resize kernels release the GIL, so threads overlap the
    decoding of different files. Like DataLoader workers, each runs torch single-threaded while
    the pool is busy: per-clip tensors are too small for intra-op threads to pay, and workers x
    intra-op threads would oversubscribe the cores (torch's thread count is process-wide; it is
    restored afterwards).
    """
    from rich.progress import Progress

    workers = max(1, min(8, os.cpu_count() or 1, len(entries)))
    kind.prepare()
    threads = torch.get_num_threads()
    results = []
    try:
        if workers > 1:
            torch.set_num_threads(1)
        with (
            Progress(console=console, transient=True) as progress,
            ThreadPoolExecutor(workers) as pool,
        ):
            task = progress.add_task(f"{kind.kind} features", total=len(entries))
            for result in pool.map(partial(_compute_entry, kind), entries):
                progress.advance(task)
                results.append(result)
    finally:
        torch.set_num_threads(threads)
    return results


# --- assembling the FeatureSet -----------------------------------------------------------------


def _keep_readable(
    samples: list[Sample], results: dict[str, list[_Result]], wanted: tuple[str, ...]
) -> tuple[list[int], list[tuple[str, str]]]:
    keep: list[int] = []
    skipped: list[tuple[str, str]] = []
    for i, sample in enumerate(samples):
        reasons = [f"{m}: {results[m][i].error}" for m in wanted if results[m][i].error]
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


def _stack_audio(
    kept: list[Sample], results: list[_Result], opts: AudioOptions
) -> tuple[torch.Tensor, float, float]:
    """``[N, 1, target_frames, mel_bins]``, ``(x - mean) / (2 std)`` as in probe_audio.normalise,
    and the mean and std used (a run records them: an exported encoder needs the same inputs).

    Missing statistics come from the real (unpadded) frames of the training samples only:
    validation and test data must not leak into the input normalisation. Padded rows hold the
    normalised log-mel zero, ``-mean / (2 std)``, as in AST.
    """
    mean, std = opts.mean, opts.std
    if mean is None or std is None:
        train = [r.tensor for s, r in zip(kept, results, strict=True) if s.split == "train"]
        train_mean, train_std = _stats(t for t in train if t is not None)
        mean = train_mean if mean is None else mean
        std = train_std if std is None else std
    out = torch.full((len(results), 1, opts.target_frames, opts.num_mel_bins), -mean / (2.0 * std))
    for i, r in enumerate(results):
        assert r.tensor is not None
        out[i, 0, : r.frames] = (r.tensor - mean) / (2.0 * std)
    return out, float(mean), float(std)


def _stats(fbanks: Iterable[torch.Tensor]) -> tuple[float, float]:
    """Mean and population std over all values, accumulated in float64."""
    total = total_sq = 0.0
    count = 0
    for x in fbanks:
        total += float(x.sum(dtype=torch.float64))
        total_sq += float(x.double().square().sum())
        count += x.numel()
    if count == 0:
        return 0.0, 1.0
    mean = total / count
    std = max(total_sq / count - mean * mean, 0.0) ** 0.5
    return mean, (std if std > 1e-6 else 1.0)  # an all-silent set: no spread to divide by


def _stack_visual(results: list[_Result], opts: VisualOptions) -> torch.Tensor:
    side = opts.stored_size
    out = torch.empty((len(results), opts.frames, 3, side, side), dtype=torch.uint8)
    for i, r in enumerate(results):
        assert r.tensor is not None
        out[i] = r.tensor
    return out
