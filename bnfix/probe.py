"""Probe data: the batch of real inputs a scan pushes through the model.

A probe is a path: one file or a folder (read recursively, in sorted order, hidden files and
folders ignored) of audio clips, images / video frames, video files, or ready tensors. A video
gives its audio track to an audio probe, and its middle frame (a 3-D model: a clip of T frames
at its segment centres) to a visual one. Whatever it holds
comes back as one float32 ``[N, C, H, W]`` tensor plus where each sample came from, so the scan
never needs to know about decoding. Unreadable files are reported and skipped: a probe folder
scraped from a dataset almost always holds a few broken files, and one of them should not stop
a scan of hundreds.
"""

from __future__ import annotations

import os
import pickle
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bnfix.errors import BnfixError, one_line
from bnfix.media.kinds import AUDIO_EXTENSIONS, IMAGE_EXTENSIONS, VIDEO_EXTENSIONS
from bnfix.probe_audio import (
    AudioOptions,
    audio_features,
    features_with_length,
    normalise,
    read_audio,
    waveform_features,
    write_demo_audio,
)
from bnfix.probe_clip import ClipOptions, read_clip, read_video_clip
from bnfix.probe_image import ImageOptions, image_features, read_image, read_video_frame

__all__ = [
    "AUDIO_EXTENSIONS",
    "IMAGE_EXTENSIONS",
    "TENSOR_EXTENSIONS",
    "VIDEO_EXTENSIONS",
    "AudioOptions",
    "ClipOptions",
    "ImageOptions",
    "Probe",
    "adapt_channels",
    "audio_features",
    "batches",
    "image_features",
    "load_probe",
    "write_demo_audio",
]

TENSOR_EXTENSIONS = (".pt", ".pth", ".npy", ".safetensors")
MODALITIES = ("audio", "visual")
TENSOR_KEYS = ("probe", "x", "inputs")

_KIND_EXTENSIONS = {
    "audio": AUDIO_EXTENSIONS,
    "image": IMAGE_EXTENSIONS,
    "video": VIDEO_EXTENSIONS,
    "tensor": TENSOR_EXTENSIONS,
}
#: Each modality's own kind of file; video files serve either, after the modality's own.
_KIND_OF_MODALITY = {"audio": "audio", "visual": "image"}
_DEFAULT_AUDIO = AudioOptions()
_DEFAULT_IMAGE = ImageOptions()


@dataclass
class Probe:
    """A probe batch and its provenance (for reports and for the "skipped" warning)."""

    tensor: torch.Tensor  # float32 [N, C, H, W]
    modality: str | None  # "audio" | "visual" | None (ready tensors of unknown modality)
    sources: list[str]  # the file each sample came from (ready tensors: the file, repeated)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    files: int = 0  # probe files found (of the probe's kind), before any limit


def load_probe(
    path: str | Path,
    modality: str | None,
    limit: int | None = None,
    audio: AudioOptions = _DEFAULT_AUDIO,
    image: ImageOptions = _DEFAULT_IMAGE,
    seed: int = 0,
    clip: ClipOptions | None = None,
) -> Probe:
    """Read the probe at ``path`` into one batch.

    ``modality`` picks which files of a folder count ("audio": audio clips, "visual": images);
    a folder holding none of those but ready tensors uses the tensors. ``None`` infers the
    kind and refuses a folder that mixes kinds, since guessing wrong would silently scan the
    model on the wrong modality. ``limit`` keeps that many samples, drawn uniformly at random
    (``seed``) and spread over the sub-folders (see :func:`sampling_order`): the first files
    in sorted order are often one class. Files beyond the limit are not even opened.
    ``clip`` (3-D visual models) makes each folder of frames one ``[3, T, H, W]`` sample, and
    ``limit`` then counts clips.

    Video files count for either modality when the folder holds none of the modality's own
    files: "audio" reads their audio tracks (a video without one is skipped), "visual" their
    middle frames, or with ``clip`` one clip of T frames each at the segment centres. Without a
    modality a video probe needs ``clip`` (a 3-D model can only mean the pictures) or a
    waveform audio input; otherwise which half of the video to scan is asked for.
    """
    if modality is not None and modality not in MODALITIES:
        raise BnfixError(f"unknown modality {modality!r}; use 'audio' or 'visual'")
    if limit is not None and limit < 1:
        raise BnfixError(f"the probe limit must be at least 1 (got {limit})")
    root = Path(path)
    if not root.exists():
        raise BnfixError(
            "probe path does not exist; pass a file or folder of audio clips, images or tensors",
            root,
        )
    kind, files, irregular = _select_files(root, modality)
    found = len(files)
    if kind == "video":
        modality = modality or _video_modality(root, clip, audio)
    if kind == "tensor":
        probe = _load_tensors(root, files, modality, limit, seed)
    elif kind == "image" and clip is not None:
        probe = _load_clips(root, files, limit, clip, seed)
        found = probe.files
    else:
        if limit is not None and len(files) > limit:
            files = sampling_order(files, root, seed)
        if kind == "audio" or (kind == "video" and modality == "audio"):
            probe = _load_audio(root, files, limit, audio)
        elif kind == "video":
            probe = _load_videos(root, files, limit, image, clip)
        else:
            probe = _load_images(root, files, limit, image)
        order = {f: i for i, f in enumerate(sorted(probe.sources))}
        probe = _reorder(
            probe, sorted(range(len(probe.sources)), key=lambda i: order[probe.sources[i]])
        )
    probe.files = found
    probe.skipped = irregular + probe.skipped  # never opened: FIFOs, sockets, devices
    return probe


def sampling_order(files: list[Path], root: Path, seed: int) -> list[Path]:
    """A seeded random order of ``files`` in which every prefix is spread over sub-folders.

    Each folder's files are shuffled; the j-th of a folder of n gets the key (j + u) / n with u
    uniform in [0, 1), and all files are sorted by key (systematic stratified sampling). A
    prefix of length L then holds about L·n/N files of every folder of n (at least one of any
    folder with n ≥ N/L), each file equally likely; a skipped unreadable file is replaced by
    the next in the order, usually from the same stratum.
    """
    g = torch.Generator().manual_seed(seed)
    folders: dict[Path, list[Path]] = {}
    for f in files:
        folders.setdefault(f.parent.relative_to(root) if f != root else Path(), []).append(f)
    keyed: list[tuple[float, Path]] = []
    for _, members in sorted(folders.items()):
        n = len(members)
        perm = torch.randperm(n, generator=g).tolist()
        offsets = torch.rand(n, generator=g, dtype=torch.float64).tolist()
        keyed += [((j + offsets[j]) / n, members[perm[j]]) for j in range(n)]
    return [f for _, f in sorted(keyed, key=lambda item: item[0])]


def _reorder(probe: Probe, index: list[int]) -> Probe:
    """The probe's samples in the order ``index`` (sorted by source: reports read naturally)."""
    if index == list(range(len(index))):
        return probe
    probe.tensor = probe.tensor[torch.tensor(index, dtype=torch.long)]
    probe.sources = [probe.sources[i] for i in index]
    return probe


#: What a probe sample looks like for a stem of each dimensionality, for messages.
SAMPLE_SHAPES = {1: "[N, C, samples]", 2: "[N, C, H, W]", 3: "[N, C, T, H, W]"}
_HOW_TO_FEED = {
    1: "an audio probe with --audio-input waveform",
    2: "images, spectrograms (audio) or a [N, C, H, W] tensor",
    3: "a folder of frame folders (one clip each, --clip-frames) or a [N, C, T, H, W] tensor",
}


def adapt_channels(
    x: torch.Tensor, in_channels: int, path: str | None = None, dims: int = 2
) -> torch.Tensor:
    """Give a probe the channel count of the model's stem (a ``dims``-D convolution).

    Repeating a spectrogram to 3 channels is the same arithmetic as summing an RGB stem's
    weights over its inputs; averaging RGB to 1 channel is the same as repeating a 1-channel
    stem ÷3 (DESIGN.md, stem adaptation), for kernels of any dimension. Anything else has no
    such equivalence.
    """
    if dims == 1 and x.ndim == 4 and x.shape[1] == 1 and x.shape[2] == 1:
        x = x[:, :, 0]  # a saved [N, 1, samples] waveform batch, read as [N, 1, 1, samples]
    if x.ndim != dims + 2:
        want = SAMPLE_SHAPES.get(dims, f"{dims + 2}-D")
        raise BnfixError(
            f"the probe is {list(x.shape)} but the model's stem is a Conv{dims}d, which takes "
            f"{want}: give it {_HOW_TO_FEED.get(dims, 'a tensor of that shape')}",
            path,
        )
    channels = x.shape[1]
    if channels == in_channels:
        return x
    if channels == 1 and in_channels == 3:
        return x.expand(-1, 3, *x.shape[2:]).contiguous()
    if channels == 3 and in_channels == 1:
        return x.mean(dim=1, keepdim=True)
    raise BnfixError(
        f"probe has {channels} channels but the model's stem takes {in_channels}; cannot adapt "
        f"(only 1 <-> 3 is supported): use a probe with {in_channels} channels",
        path,
    )


def batches(x: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Split ``x`` into consecutive batches, none of a single sample.

    Training-mode BatchNorm cannot normalise one sample (its variance is 0), so a trailing
    single sample joins the previous batch, which then holds ``batch_size + 1``.
    """
    if batch_size < 2:
        raise BnfixError(
            f"batch size must be at least 2 (got {batch_size}): training-mode BatchNorm "
            "cannot normalise a single sample"
        )
    n = x.shape[0]
    if n < 2:
        raise BnfixError(
            f"the probe has {n} sample(s); BatchNorm statistics need at least 2, add probe files"
        )
    starts = list(range(0, n, batch_size))
    if n - starts[-1] == 1:
        starts.pop()
    ends = [*starts[1:], n]
    return [x[s:e] for s, e in zip(starts, ends, strict=True)]


# --- choosing files ----------------------------------------------------------------------------


def _kind_of(path: Path) -> str | None:
    suffix = path.suffix.lower()
    for kind, extensions in _KIND_EXTENSIONS.items():
        if suffix in extensions:
            return kind
    return None


_SPECIAL_FILES = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def _not_regular(path: Path) -> str | None:
    """Why ``path`` cannot be a probe file without opening it, or None for a regular file.

    ``os.stat`` follows symbolic links, so a link to a regular file counts as one. A FIFO,
    socket or device is never opened: reading a FIFO blocks until a writer appears (forever),
    and ``/dev/zero`` never ends.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        if path.is_symlink():
            return "a broken symbolic link"
        return f"cannot stat: {e.strerror or one_line(e)}"
    if stat.S_ISREG(mode):
        return None
    what = next((name for test, name in _SPECIAL_FILES if test(mode)), "a special file")
    return f"not a regular file ({what})"


def _list_files(root: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Every non-hidden regular file under ``root``, sorted, so a probe is the same on every run,
    and the other non-hidden entries (FIFOs, sockets, devices, broken links) with the reason.

    Hidden names are skipped because macOS ``._name.wav`` resource forks and ``.DS_Store``
    would otherwise show up as unreadable samples. Only regular files (or links to them) are
    ever opened: see :func:`_not_regular`.
    """
    found: list[Path] = []
    irregular: list[tuple[Path, str]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith("."):
                continue
            f = Path(dirpath) / name
            reason = _not_regular(f)
            if reason is None:
                found.append(f)
            else:
                irregular.append((f, reason))
    return sorted(found), sorted(irregular)


def _describe(kinds: list[str]) -> str:
    return ", ".join(ext for kind in kinds for ext in _KIND_EXTENSIONS[kind])


def _select_files(
    root: Path, modality: str | None
) -> tuple[str, list[Path], list[tuple[str, str]]]:
    """Decide what kind of probe ``root`` is and which of its files belong to it.

    With a modality, its own files win, then video files, then ready tensors: a folder of
    extracted WAVs next to the videos they came from is an audio probe of the WAVs. Entries of
    the chosen kind that are not regular files come back as ``(file, reason)`` skips, unopened;
    a kind with only such entries is chosen as well, and is then the error that nothing of it
    is readable.
    """
    wanted = _KIND_OF_MODALITY.get(modality or "")
    if not root.is_dir():
        reason = _not_regular(root)
        if reason is not None:
            raise BnfixError(
                f"cannot read this probe: {reason}; pass a file or folder of audio clips, "
                "images or tensors",
                root,
            )
        kind = _kind_of(root)
        if kind is None:
            raise BnfixError(
                f"unsupported probe file type {root.suffix!r}; "
                f"use one of {_describe(['audio', 'image', 'video', 'tensor'])} or a folder",
                root,
            )
        if wanted is not None and kind not in (wanted, "video", "tensor"):
            raise BnfixError(
                f"this is an {kind} file but the modality is {modality}; pass a "
                f"{wanted} file, a folder of them or a ready tensor",
                root,
            )
        return kind, [root], []

    groups: dict[str, list[Path]] = {kind: [] for kind in _KIND_EXTENSIONS}
    unread: dict[str, list[tuple[str, str]]] = {kind: [] for kind in _KIND_EXTENSIONS}
    regular, irregular = _list_files(root)
    for f in regular:
        kind = _kind_of(f)
        if kind is not None:
            groups[kind].append(f)
    for f, reason in irregular:
        kind = _kind_of(f)
        if kind is not None:
            unread[kind].append((str(f), reason))

    def chosen(kind: str) -> tuple[str, list[Path], list[tuple[str, str]]]:
        if not groups[kind]:
            raise _nothing_readable(kind, root, unread[kind])
        return kind, groups[kind], unread[kind]

    if wanted is not None:
        for kind in (wanted, "video", "tensor"):
            if groups[kind] or unread[kind]:
                return chosen(kind)
        raise BnfixError(
            f"no {modality} probe file in this folder "
            f"(looked for {_describe([wanted, 'video', 'tensor'])}, recursively)",
            root,
        )
    present = [kind for kind in _KIND_EXTENSIONS if groups[kind] or unread[kind]]
    if not present:
        raise BnfixError(
            f"no probe file in this folder (looked for {_describe(list(_KIND_EXTENSIONS))}, "
            "recursively)",
            root,
        )
    if len(present) > 1:
        counts = " and ".join(_count(len(groups[k]) + len(unread[k]), f"{k} file") for k in present)
        raise BnfixError(
            f"the folder mixes {counts}; pass a modality (audio or visual) "
            "or point to a folder of one kind",
            root,
        )
    return chosen(present[0])


def _video_modality(root: Path, clip: ClipOptions | None, audio: AudioOptions) -> str:
    """The modality a video probe without one can only mean, or a one-line error."""
    if clip is not None:
        return "visual"  # a 3-D (video) model takes the pictures
    if audio.input == "waveform":
        return "audio"  # a 1-D (waveform) model takes the sound
    raise BnfixError(
        "video files hold sound and pictures: pass a modality (audio: their audio tracks; "
        "visual: their frames)",
        root,
    )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _nothing_readable(label: str, root: Path, skipped: list[tuple[str, str]]) -> BnfixError:
    first, reason = skipped[0]
    if root.is_file():
        return BnfixError(f"cannot read this {label} file: {reason}", root)
    return BnfixError(
        f"no readable {label} sample ({_count(len(skipped), 'file')} skipped; first: {first}: "
        f"{reason}); fix or remove the unreadable files",
        root,
    )


def _read_each(
    files: list[Path],
    limit: int | None,
    read: Callable[[Path], Any],
    samples: Callable[[Any], int] = lambda _: 1,
) -> tuple[list[Any], list[str], list[tuple[str, str]]]:
    """Apply ``read`` to files in order until ``limit`` samples are in; failures become skips."""
    results: list[Any] = []
    sources: list[str] = []
    skipped: list[tuple[str, str]] = []
    taken = 0
    for f in files:
        if limit is not None and taken >= limit:
            break
        try:
            result = read(f)
        except BnfixError as e:  # readers raise path-less BnfixErrors for unusable files
            skipped.append((str(f), str(e)))
            continue
        results.append(result)
        sources.append(str(f))
        taken += samples(result)
    return results, sources, skipped


# --- audio and images --------------------------------------------------------------------------


def _load_audio(root: Path, files: list[Path], limit: int | None, opts: AudioOptions) -> Probe:
    if opts.input == "waveform":
        return _load_waveforms(root, files, limit, opts)

    def read(f: Path) -> tuple[torch.Tensor, int]:
        wave, rate = read_audio(f, opts)
        return features_with_length(wave, rate, opts)

    results, sources, skipped = _read_each(files, limit, read)
    if not results:
        raise _nothing_readable("audio", root, skipped)
    features = torch.stack([feats for feats, _ in results])
    tensor = normalise(features, [frames for _, frames in results], opts)
    return Probe(tensor=tensor, modality="audio", sources=sources, skipped=skipped)


def _load_waveforms(root: Path, files: list[Path], limit: int | None, opts: AudioOptions) -> Probe:
    """``[N, 1, samples]`` for models whose stem is a Conv1d over the raw wave."""

    def read(f: Path) -> torch.Tensor:
        wave, rate = read_audio(f, opts)
        return waveform_features(wave, rate, opts)

    results, sources, skipped = _read_each(files, limit, read)
    if not results:
        raise _nothing_readable("audio", root, skipped)
    return Probe(torch.stack(results), modality="audio", sources=sources, skipped=skipped)


def _load_clips(
    root: Path, files: list[Path], limit: int | None, opts: ClipOptions, seed: int
) -> Probe:
    """One clip per folder that holds frames; a seeded random choice of folders past ``limit``."""
    folders: dict[Path, list[Path]] = {}
    for f in files:
        folders.setdefault(f.parent, []).append(f)
    chosen = sorted(folders)
    if limit is not None and len(chosen) > limit:
        g = torch.Generator().manual_seed(seed)
        chosen = [chosen[i] for i in torch.randperm(len(chosen), generator=g).tolist()]
    results, sources, skipped = _read_each(chosen, limit, lambda d: read_clip(folders[d], opts))
    if not results:
        raise _nothing_readable("clip", root, skipped)
    order = sorted(range(len(sources)), key=lambda i: sources[i])
    probe = Probe(
        tensor=torch.stack([results[i] for i in order]),
        modality="visual",
        sources=[sources[i] for i in order],
        skipped=skipped,
    )
    probe.files = len(folders)
    return probe


def _load_videos(
    root: Path,
    files: list[Path],
    limit: int | None,
    image: ImageOptions,
    clip: ClipOptions | None,
) -> Probe:
    """One sample per video file: its middle frame as an image, or (``clip``) a clip."""
    if clip is not None:
        results, sources, skipped = _read_each(files, limit, lambda f: read_video_clip(f, clip))
    else:
        results, sources, skipped = _read_each(files, limit, lambda f: read_video_frame(f, image))
    if not results:
        raise _nothing_readable("video", root, skipped)
    return Probe(tensor=torch.stack(results), modality="visual", sources=sources, skipped=skipped)


def _load_images(root: Path, files: list[Path], limit: int | None, opts: ImageOptions) -> Probe:
    results, sources, skipped = _read_each(files, limit, lambda f: read_image(f, opts))
    if not results:
        raise _nothing_readable("image", root, skipped)
    return Probe(tensor=torch.stack(results), modality="visual", sources=sources, skipped=skipped)


# --- ready tensors -----------------------------------------------------------------------------


def _load_tensors(
    root: Path, files: list[Path], modality: str | None, limit: int | None, seed: int = 0
) -> Probe:
    results, names, skipped = _read_each(files, None, _read_tensor_file, len)
    if not results:
        raise _nothing_readable("tensor", root, skipped)
    first_shape = results[0].shape[1:]
    for name, batch in zip(names, results, strict=True):
        if batch.shape[1:] != first_shape:
            raise BnfixError(
                f"ready tensors disagree in shape: {names[0]} holds samples of "
                f"{list(first_shape)} but {name} holds {list(batch.shape[1:])}; "
                "keep one shape per probe folder",
                root,
            )
    tensor = torch.cat(results) if len(results) > 1 else results[0]
    sources = [name for name, batch in zip(names, results, strict=True) for _ in range(len(batch))]
    if limit is not None and tensor.shape[0] > limit:
        # rows drawn at random (seeded), kept in file order: a saved batch is often sorted
        g = torch.Generator().manual_seed(seed)
        rows = torch.randperm(tensor.shape[0], generator=g)[:limit].sort().values
        tensor, sources = tensor[rows], [sources[i] for i in rows.tolist()]
    return Probe(tensor=tensor.contiguous(), modality=modality, sources=sources, skipped=skipped)


def _read_tensor_file(path: Path) -> torch.Tensor:
    suffix = path.suffix.lower()
    if suffix == ".npy":
        raw = _load_npy(path)
    elif suffix == ".safetensors":
        raw = _pick_tensor(_load_safetensors(path))
    else:
        raw = _pick_tensor(_load_pt(path))
    return _as_batch(raw)


def _load_pt(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise BnfixError(
            "cannot load with weights_only=True (the file needs pickled code); "
            "save a plain tensor or a dict of tensors"
        ) from e
    except Exception as e:  # corrupt zips and truncated pickles raise assorted types
        raise BnfixError(f"cannot load tensor file: {one_line(e)}") from e


def _load_npy(path: Path) -> torch.Tensor:
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as e:  # ValueError for object arrays, OSError/EOFError when truncated
        raise BnfixError(f"cannot load .npy file: {one_line(e)}") from e
    if not isinstance(array, np.ndarray):
        raise BnfixError("holds several arrays (.npz); save one array as .npy")
    if array.dtype.kind != "f":
        raise BnfixError(f"holds {array.dtype} values; a probe must be a float array")
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # SafetensorError, or OSError for an unreadable file
        raise BnfixError(f"cannot load safetensors file: {one_line(e)}") from e


def _pick_tensor(obj: object) -> torch.Tensor:
    """The probe inside a saved object: a bare tensor, a key from TENSOR_KEYS, or the only one."""
    if isinstance(obj, torch.Tensor):
        return obj
    if not isinstance(obj, Mapping):
        raise BnfixError(f"holds a {type(obj).__name__}; save a tensor or a dict of tensors")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    for key in TENSOR_KEYS:
        if key in tensors:
            return tensors[key]
    if len(tensors) == 1:
        return next(iter(tensors.values()))
    if not tensors:
        raise BnfixError("holds no tensor")
    names = ", ".join(sorted(tensors)[:5])
    raise BnfixError(
        f"holds {len(tensors)} tensors ({names}) and none is named probe, x or inputs; "
        "save one tensor or name the probe 'probe'"
    )


def _as_batch(t: torch.Tensor) -> torch.Tensor:
    """Check a loaded tensor is a usable batch: ``[N, C, H, W]`` (``[N, H, W]`` gets C=1) or a
    clip batch ``[N, C, T, H, W]``. (A saved waveform batch ``[N, 1, samples]`` thus reads as
    ``[N, 1, 1, samples]``; :func:`adapt_channels` takes it for a Conv1d stem.)"""
    if not t.is_floating_point():
        raise BnfixError(f"holds {t.dtype} values; a probe must be a normalised float tensor")
    if t.ndim == 3:
        t = t.unsqueeze(1)
    if t.ndim not in (4, 5):
        raise BnfixError(
            f"has shape {list(t.shape)}; expected [N, C, H, W], [N, H, W] or [N, C, T, H, W]"
        )
    if t.shape[0] == 0:
        raise BnfixError("holds 0 samples")
    t = t.detach().to(torch.float32)  # a saved leaf may still require grad
    if not torch.isfinite(t).all():
        raise BnfixError("holds NaN or infinite values")
    return t
