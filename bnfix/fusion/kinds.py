"""What each modality stores: the feature computation, the entry keys and the row shapes.

A *kind* turns one manifest cell (an audio file, a video, a frame folder, an image) into one
fixed-shape row of its :class:`~bnfix.fusion.store.FeatureStore`, and says what the row depends
on: its name (the source path and the parameters) and its key (the source's stat data), so that
:mod:`bnfix.fusion.features` can tell a fresh row from a stale one without decoding anything.
Kinds are picklable: :mod:`bnfix.fusion.extract` sends them to its worker processes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bnfix.errors import BnfixError, one_line
from bnfix.fusion.extract import Computed
from bnfix.fusion.manifest import Sample
from bnfix.fusion.store import FeatureStore
from bnfix.probe_audio import AudioOptions

__all__ = [
    "CACHE_VERSION", "AudioKind", "Entry", "Kind", "VisualKind", "VisualOptions", "decode_frame",
    "decode_image", "fit_square", "frame_files", "frame_indices",
]  # fmt: skip

#: Bump when what an entry holds changes meaning, so that old stores are re-extracted.
CACHE_VERSION = 3  # 3: memory-mapped stores; video files; whole-frame and per-fps layouts
SAMPLINGS = ("middle", "random")
CROPS = ("fixed-scale", "random-resized")
EVAL_RESIZES = ("center-crop", "full-frame")


@dataclass(frozen=True)
class VisualOptions:
    """Which frames are stored and how training and evaluation see them.

    The defaults are bnfix's pipeline: T frames at segment middles, stored once as squares of
    ``S = round(size * 8 / 7)`` (shorter side resized, centre-cropped); training crops ``size``
    at a random place of the square, evaluation takes its centre. The official FusT/OGM-GE data
    code instead draws one random frame per segment every epoch (``sampling = "random"``: all
    frames at ``fps``, at most ``max_frames``, are stored), trains on ``RandomResizedCrop(size)``
    (``crop = "random-resized"``) and evaluates on the whole frame resized to size x size
    (``eval_resize = "full-frame"``); both of the latter need the whole frame, so then frames
    are stored whole, squashed to S x S squares with their aspect ratio recorded, and crops are
    drawn in the source frame's own proportions.
    """

    frames: int = 3  # T: frames per sample (segments)
    size: int = 224  # the crop the encoder sees
    sampling: str = "middle"  # "middle": segment middles, fixed; "random": one per segment/epoch
    crop: str = "fixed-scale"  # training: "fixed-scale" or "random-resized"
    eval_resize: str = "center-crop"  # evaluation: "center-crop" or "full-frame"
    fps: float = 1.0  # sampling "random": frames stored per second of video
    max_frames: int = 10  # sampling "random": frames stored per sample at most

    def __post_init__(self) -> None:
        if self.frames < 1:
            raise BnfixError(f"visual frames must be at least 1 (got {self.frames})")
        if self.size < 1:
            raise BnfixError(f"visual size must be at least 1 (got {self.size})")
        for name, value, allowed in (
            ("sampling", self.sampling, SAMPLINGS),
            ("crop", self.crop, CROPS),
            ("eval_resize", self.eval_resize, EVAL_RESIZES),
        ):
            if value not in allowed:
                raise BnfixError(
                    f"data.visual.{name}: unknown value {value!r}; use one of {', '.join(allowed)}"
                )
        if not (math.isfinite(self.fps) and self.fps > 0):
            raise BnfixError(f"data.visual.fps must be a positive number (got {self.fps})")
        if self.sampling == "random" and self.max_frames < self.frames:  # else unused
            raise BnfixError(
                f"data.visual.max_frames ({self.max_frames}) must be at least data.visual.frames "
                f"({self.frames})"
            )

    @property
    def stored_size(self) -> int:
        """Side of the stored squares: the ImageNet resize-before-crop ratio (256 for 224)."""
        return round(self.size * 8 / 7)

    @property
    def whole(self) -> bool:
        """Frames stored whole (squashed, aspect recorded) rather than centre-cropped squares."""
        return self.crop != "fixed-scale" or self.eval_resize != "center-crop"

    @property
    def stored_frames(self) -> int:
        return self.frames if self.sampling == "middle" else self.max_frames


@dataclass
class Entry:
    name: str  # entry name: hash of kind, source and parameters
    key: str  # digest of everything the features depend on ("" when the source is unreadable)
    source: Any
    error: str | None = None


def _readable(source: Path) -> os.stat_result:
    """``source``'s stat, if this process may read it. A file it may not read would reach the
    decoder, fail as "cannot decode", and be stored under its stat as undecodable for good:
    a ``chmod`` changes neither size nor mtime, so fixing the permission would not bring it
    back. Raised here, the error gets no key and is retried on the next run."""
    st = source.stat()
    if not os.access(source, os.R_OK):
        raise PermissionError(errno.EACCES, "permission denied", str(source))
    return st


class Kind:
    """What differs between the audio and the visual store: keys, shapes, computing."""

    kind: str

    def params(self) -> dict[str, object]:
        raise NotImplementedError

    def shape(self) -> tuple[tuple[int, ...], str]:
        raise NotImplementedError

    def path(self, sample: Sample) -> Path:
        raise NotImplementedError

    def describe(self, source: Path) -> tuple[dict[str, object], Any]:
        """What the entry is computed from (stat data), and what ``compute`` is given."""
        st = _readable(source)
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}, source

    def prepare(self) -> None:
        """Import the decoders once per process (torchaudio and torchvision cost ~1 s)."""

    def compute(self, source: Any) -> Computed:
        raise NotImplementedError

    def _params_once(self) -> dict[str, object]:
        """:meth:`params`, built once: ``entry`` needs it for every sample (200k on VGGSound),
        and ``asdict`` was half of an entry's cost."""
        cached = self.__dict__.get("_params")
        if cached is None:
            cached = self.__dict__["_params"] = self.params()
        return cached

    def store(self, cache_dir: Path) -> FeatureStore:
        params = {"v": CACHE_VERSION, "kind": self.kind, **self._params_once()}
        digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
        shape, dtype = self.shape()
        return FeatureStore(cache_dir / "store" / f"{self.kind}-{digest}", shape, dtype, params)

    def entry(self, sample: Sample) -> Entry:
        # Absolute, not resolved again: a manifest's paths are resolved already, and a second
        # resolve per sample was 60% of an entry's cost (an unresolved path would only give
        # the same file a second entry, never another file's features: the key holds its stat)
        source = Path(os.path.abspath(self.path(sample)))
        identity = {"v": CACHE_VERSION, "kind": self.kind, "path": str(source)}
        identity["params"] = self._params_once()
        name = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:40]
        try:
            stat, what = self.describe(source)
        except BnfixError as e:  # no key: never a hit (describing is cheap)
            return Entry(name, "", source, error=one_line(e))
        except OSError as e:  # vanished or unreadable since the manifest was read
            return Entry(name, "", source, error=f"cannot read: {e.strerror or one_line(e)}")
        key = json.dumps({**identity, "stat": stat}, sort_keys=True)  # a digest: index lines
        return Entry(name, hashlib.sha256(key.encode()).hexdigest()[:40], what)  # stay short


class AudioKind(Kind):
    kind = "audio"

    def __init__(self, opts: AudioOptions) -> None:
        self.opts = opts

    def params(self) -> dict[str, object]:
        # mean/std are applied when read, so they do not change what is stored.
        return {k: v for k, v in asdict(self.opts).items() if k not in ("mean", "std")}

    def shape(self) -> tuple[tuple[int, ...], str]:
        return (self.opts.target_frames, self.opts.num_mel_bins), "<f4"

    def path(self, sample: Sample) -> Path:
        assert sample.audio is not None
        return sample.audio

    def prepare(self) -> None:
        import torchaudio.compliance.kaldi
        import torchaudio.transforms  # noqa: F401

    def compute(self, source: Path) -> Computed:
        from bnfix.probe_audio import features_with_length, read_audio

        wave, rate = read_audio(source, self.opts)
        fbank, frames = features_with_length(wave, rate, self.opts)
        real = fbank[:frames].double()
        return Computed(
            array=fbank.numpy().astype(np.float32, copy=False),
            frames=frames,
            total=float(real.sum()),
            total_sq=float(real.square().sum()),
            count=real.numel(),
        )


class VisualKind(Kind):
    kind = "visual"

    def __init__(self, opts: VisualOptions) -> None:
        self.opts = opts

    def params(self) -> dict[str, object]:
        o = self.opts
        params: dict[str, object] = {"frames": o.stored_frames, "stored_size": o.stored_size}
        params["layout"] = "whole" if o.whole else "square"
        params["sampling"] = o.sampling
        if o.sampling == "random":
            params["fps"] = o.fps
        return params

    def shape(self) -> tuple[tuple[int, ...], str]:
        side = self.opts.stored_size
        return (self.opts.stored_frames, 3, side, side), "|u1"

    def path(self, sample: Sample) -> Path:
        assert sample.frames is not None
        return sample.frames

    def describe(self, source: Path) -> tuple[dict[str, object], Any]:
        """For a folder: the frame count and the picked frames' stats, not every frame's.

        Which frames are picked depends only on the sorted names, so a frame added, removed or
        renamed changes the count or the picked names, and a picked frame rewritten changes its
        stat; a long 25 fps clip costs T stat calls, not hundreds.
        """
        if not source.is_dir():
            return super().describe(source)
        from bnfix.media import IMAGE_EXTENSIONS

        frames = frame_files(source)
        if not frames:
            raise BnfixError(f"no image frames ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
        keep = (
            self.opts.frames
            if self.opts.sampling == "middle"
            else min(len(frames), self.opts.max_frames)
        )
        picked = [frames[i] for i in frame_indices(len(frames), keep)]
        stats = []
        for f in dict.fromkeys(picked):
            st = _readable(f)
            stats.append([f.name, st.st_size, st.st_mtime_ns])
        return {"count": len(frames), "picked": stats}, picked

    def prepare(self) -> None:
        import torchvision.transforms.v2.functional  # noqa: F401

    def compute(self, source: Path | list[Path]) -> Computed:
        from bnfix.media import media_kind

        if isinstance(source, list):
            decoded = {f: decode_image(f) for f in dict.fromkeys(source)}
            frames = [decoded[f] for f in source]
        elif media_kind(source) == "video":
            frames = list(self._video_frames(source))
        else:
            frames = [decode_image(source)]
        if len({tuple(f.shape) for f in frames}) != 1:
            raise BnfixError("its frames differ in size; a clip's frames must share one size")
        height, width = frames[0].shape[-2:]
        side = self.opts.stored_size
        stack = torch.stack([fit_square(f, side, self.opts.whole) for f in frames])
        held = len(frames)
        want = self.opts.stored_frames
        if self.opts.sampling == "middle" and held == 1:
            stack, held = stack.expand(want, -1, -1, -1), want  # one image: a still clip
        row = torch.zeros((want, 3, side, side), dtype=torch.uint8)
        row[:held] = stack[:want]
        return Computed(array=row.numpy(), frames=min(held, want), aspect=width / height)

    def _video_frames(self, path: Path) -> torch.Tensor:
        from bnfix.media import read_frames, read_segments, segment_times, video_info

        if self.opts.sampling == "middle":
            return read_segments(path, self.opts.frames)  # one opening of the file
        info = video_info(path)  # the frame count follows the duration
        count = max(1, min(self.opts.max_frames, round(info.duration * self.opts.fps)))
        return read_frames(path, segment_times(info.duration, count))


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
    from bnfix.media import IMAGE_EXTENSIONS

    with os.scandir(folder) as it:
        names = [
            Path(e.path)
            for e in it
            if not e.name.startswith(".")
            and Path(e.name).suffix.lower() in IMAGE_EXTENSIONS
            and e.is_file()
        ]
    return sorted(names, key=_natural_key)


def decode_image(path: Path) -> torch.Tensor:
    """RGB uint8 ``[3, H, W]`` of one image, by the probes' decoder (16-bit scaled to 8)."""
    from bnfix.probe_image import ImageDecodeError, decode_rgb

    try:
        return decode_rgb(path)
    except ImageDecodeError as e:
        reason = e.reason if len(e.reason) <= 100 else e.reason[:100] + "…"
        raise BnfixError(f"cannot decode image {path.name}: {reason}") from e


def fit_square(pixels: torch.Tensor, side: int, whole: bool = False) -> torch.Tensor:
    """A stored ``side`` square of uint8 ``[..., 3, H, W]``: the centre crop of the
    shorter-side resize, or (``whole``) the whole frame squashed to the square."""
    import torchvision.transforms.v2.functional as TF

    if whole:
        return TF.resize(pixels, [side, side], antialias=True).contiguous()
    resized = TF.resize(pixels, [side], antialias=True)
    return TF.center_crop(resized, [side, side]).contiguous()


def decode_frame(path: Path, side: int) -> torch.Tensor:
    """RGB uint8 ``[3, side, side]``: shorter side resized to ``side``, centre-cropped.

    The same resize (on uint8, antialiased) and crop as the ImageNet pipeline in
    :mod:`bnfix.probe_image`, stopped before the float conversion so the store stays uint8.
    """
    return fit_square(decode_image(path), side)
