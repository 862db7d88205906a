"""Video decoding: the frames shown at given times, found by seeking, in display orientation.

A probe or a fusion pipeline wants a few frames of each clip (its middle frame, or T frames
at segment centres), not all of them. Decoding a 10 s clip from the start to reach three
frames decodes every frame; seeking to the keyframe before each time and decoding forward
from there decodes about half a GOP per frame asked for. :func:`read_frames` does that, and
keeps decoding instead of seeking when the next time is ahead in the same GOP (a seek there
would land on the same keyframe and decode the same frames again).

Times are seconds from the video stream's first frame (its ``start_time``: MPEG-TS streams
start at 1.4 s, MP4s with B-frames may start below 0), so t = 0 is the first frame on every
container. "The frame at t" is the frame on screen at t: the last frame whose presentation
time is <= t, the first frame for a t before it, the last frame for a t past the end.

Each call opens its own container (``with``), so calls are independent across threads and
processes (nothing is shared but the counters behind :func:`decode_stats`, which are locked).
Errors are path-less :class:`~bnfix.errors.BnfixError` with a one-line reason.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bnfix.errors import BnfixError
from bnfix.media.container import open_input, reason

#: Tolerance on times (s): a frame at exactly t (up to float rounding) is the frame at t.
_EPS = 1e-6
#: Without a keyframe index, seek only when the next time is this far ahead (s); a seek can
#: then land on the keyframe already passed, which costs a re-decode but stays correct.
_SEEK_GAP = 1.0
#: How far back (s) a seek that landed after its target first retries, doubling each time.
_RETRY_BACK = 1.0
_RETRIES = 4
#: Decoders whose ``skip_frame = NONREF`` drops exactly the frames nothing refers to, checked
#: against a full decode at many times (tests/test_media.py). libdav1d (AV1) is not among
#: them: with skipping it hands out the frame before the one shown in about 40% of reads.
_SKIP_SAFE_DECODERS = frozenset({"h264", "hevc", "mpeg4", "vp8", "vp9", "flv"})
#: Containers whose seeks give frames with the wrong times (MPEG program streams: after a seek
#: into an open GOP the timestamps run 2-3 frames ahead of the pictures) and whose stated
#: duration is an estimate (FFmpeg's guess from the bit rate was 2.96 s for a 4-s .mpg):
#: decoded straight through, their duration measured from the packets.
_UNSEEKABLE_FORMATS = frozenset({"mpeg", "mpegvideo"})
#: Containers whose stated duration (Matroska's segment Duration, FFmpeg's per-track DURATION
#: tag) is where the stream ends, not how long it is: the same number while it starts at 0,
#: the start plus the length in a later piece of FFmpeg's segment muxer or a -copyts remux.
_END_STATED_FORMATS = frozenset({"matroska", "webm"})


@dataclass(frozen=True)
class VideoInfo:
    """What a pipeline needs to know before asking for frames.

    ``width``/``height`` are the display size (swapped for a 90/270 rotation);
    ``rotation`` is the clockwise turn (0/90/180/270) the container asks for at display, which
    :func:`read_frames` applies. ``frames`` is the container's frame count, when it has one.
    """

    duration: float  # seconds, from the first frame
    fps: float  # average frame rate (0.0 when the container gives none)
    width: int
    height: int
    rotation: int
    has_audio: bool
    frames: int | None


# --- counters (tests and benchmarks check that seeking decodes less) ---------------------------

_STATS_LOCK = threading.Lock()
_STATS = {"opened": 0, "seeks": 0, "packets": 0, "packets_dropped": 0, "frames_decoded": 0}


def decode_stats() -> dict[str, int]:
    """Totals since the last reset: containers opened, seeks, video packets sent to the
    decoder, video frames it returned (dropped non-reference frames are not counted)."""
    with _STATS_LOCK:
        return dict(_STATS)


def reset_decode_stats() -> None:
    with _STATS_LOCK:
        for key in _STATS:
            _STATS[key] = 0


def _count(key: str, n: int = 1) -> None:
    with _STATS_LOCK:
        _STATS[key] += n


# --- public API --------------------------------------------------------------------------------


def segment_times(duration: float, count: int) -> list[float]:
    """Centres of ``count`` equal segments of ``[0, duration]``: ``(i + 0.5) · duration / count``.

    The usual frame sampling of video classifiers (TSN's segments, the paper's T frames): one
    frame per segment, deterministic at evaluation.
    """
    if count < 1:
        raise ValueError(f"count must be at least 1 (got {count})")
    return [(i + 0.5) * duration / count for i in range(count)]


def video_info(path: Path) -> VideoInfo:
    """Duration, rate, display size and rotation of the first video stream.

    Decodes the first frame: the rotation is side data that PyAV exposes on frames, and a file
    whose first frame does not decode is better refused here than mid-pipeline.
    """
    with _open_video(path) as video:
        first = video.cursor().at(0.0, allow_seek=False)
        rotation = _clockwise(first.frame)
        duration = video.duration()
        w, h = video.display_width(first.frame.width), first.frame.height
        if rotation in (90, 270):
            w, h = h, w
        return VideoInfo(
            duration=duration,
            fps=video.fps(),
            width=int(w),
            height=int(h),
            rotation=rotation,
            has_audio=bool(video.container.streams.audio),
            frames=int(video.stream.frames) if video.stream.frames else None,
        )


def read_frames(path: Path, times: Sequence[float]) -> torch.Tensor:
    """uint8 ``[T, 3, H, W]``: the frame shown at each of ``times`` (seconds), display upright.

    Times may come in any order and repeat; they are visited in increasing order, seeking to
    the keyframe before a time unless the frames already decoded lead there without passing a
    keyframe. All frames come out at the size of the first one (a mid-stream size change is
    rescaled to it).
    """
    wanted = _check_times(times)
    with _open_video(path) as video:
        return _frames_at(video, wanted)


def read_segments(path: Path, count: int) -> torch.Tensor:
    """uint8 ``[count, 3, H, W]``: the frames at ``segment_times(duration, count)``.

    :func:`video_info` then :func:`read_frames` in one opening of the file: the deterministic
    T-frame sampling of a clip (``count=1``: its middle frame).
    """
    if count < 1:
        raise ValueError(f"count must be at least 1 (got {count})")
    with _open_video(path) as video:
        return _frames_at(video, segment_times(video.duration(), count))


def _frames_at(video: _Video, wanted: list[float]) -> torch.Tensor:
    cursor = video.cursor(skip_ahead=True)
    order = sorted(range(len(wanted)), key=lambda i: wanted[i])
    rgb = _Converter(video)
    found: list[np.ndarray | None] = [None] * len(wanted)
    for i in order:
        found[i] = rgb.add(cursor.at(wanted[i], allow_seek=True))
    video.check_not_truncated(cursor, max(wanted))
    return _stack([f for f in found if f is not None])


def read_frames_at_fps(path: Path, fps: float, max_frames: int | None = None) -> torch.Tensor:
    """uint8 ``[F, 3, H, W]``: the frame shown at ``t = (k + 0.5) / fps`` for every t < duration.

    One sequential pass (no seeks): at a sampling rate near the video's own, every frame is
    decoded anyway. ``F >= 1`` (a clip shorter than half a period gives its first frame);
    ``max_frames`` keeps the first that many.
    """
    if not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive number (got {fps})")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be at least 1 (got {max_frames})")
    with _open_video(path) as video:
        duration = video.duration()
        count = max(1, math.ceil(duration * fps - 0.5 - _EPS))
        if max_frames is not None:
            count = min(count, max_frames)
        times = [(k + 0.5) / fps for k in range(count)]
        cursor = video.cursor()
        rgb = _Converter(video)
        period = video.period()
        found = []
        for t in times:
            frame = cursor.at(t, allow_seek=False)
            ended = found and cursor.done and cursor.last is not None
            if ended and t >= cursor.last.time + period:  # past the last frame's end: the
                break  # duration stated was the container's (its audio ran longer: FLV, MKV)
            found.append(rgb.add(frame))
        video.check_not_truncated(cursor, times[-1])
        return _stack(found)


# --- internals ---------------------------------------------------------------------------------


def _tag_seconds(text: object) -> float | None:
    """``"00:00:02.000000000"`` (a Matroska track's DURATION tag) in seconds; None if absent
    or not of that form."""
    if not isinstance(text, str):
        return None
    parts = text.strip().split(":")
    if len(parts) != 3:
        return None
    try:
        hours, minutes, seconds = (float(p) for p in parts)
    except ValueError:
        return None
    total = hours * 3600 + minutes * 60 + seconds
    return (
        total if math.isfinite(total) and total > 0 and min(hours, minutes, seconds) >= 0 else None
    )


def _check_times(times: Sequence[float]) -> list[float]:
    wanted = [float(t) for t in times]
    if not wanted:
        raise ValueError("no frame times given")
    bad = [t for t in wanted if not math.isfinite(t)]
    if bad:
        raise ValueError(f"frame times must be finite numbers (got {bad[0]})")
    return wanted


def _clockwise(frame: Any) -> int:
    """The display matrix's rotation as a clockwise turn in {0, 90, 180, 270}.

    ``VideoFrame.rotation`` is FFmpeg's ``av_display_rotation_get``: the counter-clockwise
    angle of the matrix; FFmpeg's own autorotation turns the picture by its negation (a phone's
    ``rotate=90`` tag reads -90 here and is shown turned 90° clockwise). Flips in the matrix are
    not applied (PyAV exposes the angle only).
    """
    try:
        angle = float(frame.rotation or 0.0)
    except (AttributeError, TypeError, ValueError):
        return 0
    if not math.isfinite(angle):
        return 0
    return round(-angle / 90.0) % 4 * 90


@dataclass
class _Frame:
    frame: Any  # av.VideoFrame, converted to RGB only if chosen
    time: float  # seconds from the stream's start


class _Video:
    """An open container and its first video stream, with times relative to its start."""

    def __init__(self, container: Any, path: Path) -> None:
        self.container, self.path = container, path
        self.stream = _video_stream(container)
        # One decoding thread: slice threads do nothing for the usual (unsliced) H.264 yet
        # cost ~1 ms to start per file, and callers parallelise over files (worker processes).
        self.stream.thread_type = "NONE"
        self.time_base = self.stream.time_base
        start = self.stream.start_time
        self.start_pts = int(start) if start is not None else 0
        # the container's format names ("mov,mp4,m4a,3gp,3g2,mj2" is six)
        name = getattr(getattr(container, "format", None), "name", "") or ""
        self.formats = set(name.split(","))
        self.seekable = not self.formats & _UNSEEKABLE_FORMATS
        # A stated end past a late start would pass as a length (4 s of frames from 4 s to
        # 8 s read as 8 s: the frames chosen past the middle, or the file called truncated);
        # below one frame the difference changes no frame chosen.
        start_s = float(self.start_pts * self.time_base)
        ends = start_s > self.period() and bool(self.formats & _END_STATED_FORMATS)
        self.stated = self.seekable and not ends
        self._stated_from = start_s if ends else 0.0  # where a stated figure counts from

    def seconds(self, pts: int) -> float:
        return float((pts - self.start_pts) * self.time_base)

    def pts(self, seconds: float) -> int:
        return self.start_pts + math.floor(seconds / self.time_base + _EPS)

    def fps(self) -> float:
        s = self.stream
        rate = s.average_rate or s.guessed_rate or s.base_rate
        return float(rate) if rate else 0.0

    def display_width(self, width: int) -> int:
        """The width a player shows a ``width``-pixel row at: stored pixels are not square
        in DV, HDV, DVD and much broadcast video (1440 × 1080 with pixels 4:3 wide is
        1920 × 1080), and a model should see the picture's proportions, not the raster's."""
        sar = self.stream.sample_aspect_ratio
        if not sar or sar <= 0 or sar == 1:
            return int(width)
        return max(1, round(width * sar))

    def period(self) -> float:
        """Seconds per frame: 1 / fps, or 25 fps's 0.04 when the container states no rate."""
        fps = self.fps()
        return 1.0 / fps if fps > 0 else 0.04

    def declared_duration(self) -> float | None:
        """The video stream's duration if the container states it — as a field, or as the
        ``DURATION`` tag Matroska/WebM muxers write per track — else the container's, when the
        video is its only stream (with audio beside it that may be the audio's length). None
        where what is stated is not a length (``stated``)."""
        if not self.stated:
            return None
        s = self.stream
        if s.duration and s.duration > 0:
            return float(s.duration * self.time_base)
        tagged = _tag_seconds((s.metadata or {}).get("DURATION"))
        if tagged is not None:
            return tagged
        c = self.container
        if c.duration and c.duration > 0 and len(c.streams) == 1:
            return c.duration / 1_000_000
        return None

    def duration(self) -> float:
        """Seconds from the first frame to the end: stated, or the container's, or measured
        from the packets' timestamps (a separate pass, for containers that state nothing)."""
        d = self.declared_duration() if self.stated else _scan_duration(self.path)
        c = self.container
        if d is None and c.duration and c.duration > 0:
            d = c.duration / 1_000_000 - self._stated_from
        if d is None:
            d = _scan_duration(self.path)
        if not d or d <= 0:
            raise BnfixError("zero-length video")
        return d

    def keyframe_times(self) -> list[float]:
        """Keyframe times from the demuxer's index (empty when it has none).

        Index timestamps are decode times; a stream with B-frames decodes its first keyframe
        before its start (an MP4's first entry at -2 frames), and that offset is added back so
        the times are presentation times, near enough to choose between seeking and decoding.
        """
        try:
            stamps = sorted(e.timestamp for e in self.stream.index_entries if e.is_keyframe)
        except Exception:  # an index PyAV cannot read is no index
            return []
        if not stamps:
            return []
        shift = max(self.start_pts - stamps[0], 0)
        return [self.seconds(ts + shift) for ts in stamps]

    def cursor(self, skip_ahead: bool = False) -> _Cursor:
        return _Cursor(self, skip_ahead)

    def check_not_truncated(self, cursor: _Cursor, latest: float) -> None:
        """Refuse a file whose frames stop well before its own stated duration.

        A truncated MP4 with its index up front opens fine and simply runs out of packets;
        handing out its last frame for every later time would pass a broken file as a still
        video.
        """
        if not cursor.done or cursor.last is None:
            return
        stated = self.declared_duration()
        if stated is None:
            return
        period = self.period()
        slack = max(0.5, 2 * period)
        end = cursor.last.time + period
        if min(latest, stated) > end + slack:
            raise BnfixError(
                f"truncated video: frames stop at {end:.2f} s of its stated {stated:.2f} s"
            )


class _Cursor:
    """Decoding position in one video: the last frame at or before the latest time asked for
    (``prev``) and the first frame after it (``pending``, already decoded).

    While catching up to a time far ahead (``skip_ahead``), packets more than two frame
    periods before it are decoded with ``skip_frame = NONREF``: frames no other frame refers
    to (most B-frames, about half of an x264 stream) are dropped unseen, since they cannot be
    the frame shown at the target. Should a dropped frame have been that frame after all (a
    variable-rate video with a long gap before the target), :meth:`at` notices that a skipped
    packet lies between the frame it found and the target, and decodes that stretch again
    without skipping.
    """

    def __init__(self, video: _Video, skip_ahead: bool = False) -> None:
        self.video = video
        self.keyframes = video.keyframe_times()
        # MP4/MOV index every sample at open: one keyframe there means one keyframe in the file
        # (ffmpeg's default keyint of 250 makes that common for 10-s clips), and seeking to it
        # again for every later time would re-decode the clip from the start each time.
        # Elsewhere a one-entry index may be all that was read so far: judge by the gap.
        self._index_complete = len(self.keyframes) >= 2 or (
            bool(self.keyframes) and "mp4" in video.formats
        )
        codec = getattr(getattr(video.stream, "codec_context", None), "name", "")
        # dropping frames relies on seeking back should a dropped one be the one shown
        self.skip_ahead = skip_ahead and codec in _SKIP_SAFE_DECODERS and video.seekable
        self._packets: Iterator[Any] | None = None
        self._queue: list[Any] = []  # frames decoded from the last packet, not yet taken
        self._started = False
        self._skipping = False
        self._target_pts: float | None = None  # skip non-reference packets before this pts
        self._skipped_up_to: float | None = None  # latest pts of a packet sent while skipping
        self._await_keyframe = False  # after a seek: drop packets up to the next keyframe
        self.prev: _Frame | None = None
        self.pending: _Frame | None = None
        self.last: _Frame | None = None  # the latest frame decoded
        self.done = False
        self.damage: str | None = None  # why decoding stopped early, if it did
        period = video.period()
        self._margin_pts = 2 * period / float(video.time_base)

    def at(self, t: float, allow_seek: bool) -> _Frame:
        """The frame shown at ``t``; calls must come with non-decreasing ``t``."""
        seek_to = t if allow_seek and self._worth_seeking(t) else None
        back = _RETRY_BACK
        for attempt in range(_RETRIES + 2):
            if seek_to is not None:
                self._seek(seek_to)
            self._target_pts = self.video.start_pts + t / float(self.video.time_base)
            self._advance_to(t)
            self._target_pts = None
            if self._skipped_past(self.prev, t):
                # a dropped non-reference frame may have been the one shown at t: again,
                # from the keyframe before t, without dropping anything
                self.skip_ahead = False
                seek_to = t
                continue
            if self.prev is not None:
                return self.prev
            # Nothing at or before t decoded: t is before the video's first frame, or the seek
            # landed past its target (a coarse index, or an index pointing past a cut-off
            # end): go back further.
            if seek_to is None or seek_to <= 0.0:
                break
            if self.pending is not None and self.pending.time <= t + _EPS:
                break
            # the last try decodes from the start: nothing before t can be missed then
            seek_to = max(t - back, 0.0) if attempt < _RETRIES else 0.0
            back *= 2
        if self.pending is None:
            why = f": {self.damage}" if self.damage else ""
            raise BnfixError(f"cannot decode video: no frame decodes{why}")
        return self.pending

    def _skipped_past(self, found: _Frame | None, t: float) -> bool:
        """Whether a packet sent while skipping lies after ``found`` and at or before ``t``."""
        if self._skipped_up_to is None:
            return False
        skipped = self.video.seconds(round(self._skipped_up_to))
        return (found is None or skipped > found.time + _EPS) and skipped <= t + _EPS

    def _worth_seeking(self, t: float) -> bool:
        if self.done or not self.video.seekable:
            return False  # at the end already: every later time is the last frame
        here = self.pending or self.prev
        if here is None:
            if self._started:
                return False
            here_t = 0.0  # not started: decoding begins at the first frame
        else:
            here_t = here.time
        if t <= here_t + _EPS:
            return False  # the frame is decoded already
        if self._index_complete:
            return any(here_t + _EPS < k <= t + _EPS for k in self.keyframes)
        return t - here_t > _SEEK_GAP

    def _seek(self, t: float) -> None:
        v = self.video
        # To the start: timestamp 0 where the stream starts later. MPEG-TS lands on the packet
        # after the one asked for when asked for its first timestamp exactly (its seeks search
        # by timestamp); AVI refuses negative ones.
        target = v.pts(t) if t > 0 else min(v.start_pts, 0)
        try:
            v.container.seek(target, stream=v.stream, backward=True, any_frame=False)
        except Exception as e:  # av.FFmpegError, or PermissionError on a non-seekable input
            raise BnfixError(f"cannot seek in video: {reason(e)}") from e
        _count("seeks")
        self._packets = None
        self._queue = []
        self._skipped_up_to = None
        # Without an index (MPEG-TS, MPEG-PS) a seek can land between keyframes, and frames
        # decoded from there lack their references: H.264 hands them out with whatever the
        # missing pictures leave (a wrong frame, silently). Decoding restarts at a keyframe.
        self._await_keyframe = t > 0
        self.prev = self.pending = None
        self.done = False

    def _advance_to(self, t: float) -> None:
        """Decode until ``pending`` is past ``t`` (or the stream ends)."""
        while not self.done and (self.pending is None or self.pending.time <= t + _EPS):
            if self.pending is not None:
                self.prev = self.pending
            self.pending = self._next()
            if self.pending is None:
                self.done = True

    def _next(self) -> _Frame | None:
        v = self.video
        try:
            while not self._queue:
                if self._packets is None:
                    self._packets = v.container.demux(v.stream)
                    self._started = True
                packet = next(self._packets, None)
                if packet is None:
                    return None
                if self._await_keyframe:
                    if not packet.is_keyframe:
                        _count("packets_dropped")
                        continue
                    self._await_keyframe = False
                self._skip_or_not(packet)
                _count("packets")
                self._queue = list(v.stream.decode(packet))
            frame = self._queue.pop(0)
        except BnfixError:
            raise
        except Exception as e:  # av.FFmpegError subclasses on damaged packets
            if _is_eof_damage(e):
                # a cut-off or damaged tail (or a seek into one): what decoded stands, and the
                # caller retries earlier or checks for truncation
                self.damage = reason(e)
                return None
            raise BnfixError(f"cannot decode video: {reason(e)}") from e
        _count("frames_decoded")
        pts = frame.pts if frame.pts is not None else frame.dts
        if pts is not None:
            time = v.seconds(int(pts))
        elif self.last is not None:  # no timestamp at all: one period after the previous frame
            time = self.last.time + v.period()
        else:
            time = 0.0
        self.last = _Frame(frame, time)
        return self.last

    def _skip_or_not(self, packet: Any) -> None:
        """Drop non-reference frames of packets well before the target; decode all others."""
        pts = packet.pts
        skip = (
            self.skip_ahead
            and self._target_pts is not None
            and pts is not None
            and packet.size > 0
            and pts < self._target_pts - self._margin_pts
        )
        if skip:
            self._skipped_up_to = (
                pts if self._skipped_up_to is None else max(self._skipped_up_to, pts)
            )
        if skip != self._skipping:
            self.video.stream.codec_context.skip_frame = "NONREF" if skip else "DEFAULT"
            self._skipping = skip


def _is_eof_damage(e: BaseException) -> bool:
    """Errors FFmpeg raises at a cut-off end of file (as opposed to an unreadable stream)."""
    import av

    return isinstance(e, av.error.EOFError | av.error.InvalidDataError)


@contextlib.contextmanager
def _open_video(path: Path) -> Iterator[_Video]:
    try:
        container = open_input(Path(path))
    except Exception as e:  # av.FFmpegError, OSError, UnicodeDecodeError on odd headers
        raise BnfixError(f"cannot open video: {reason(e)}") from e
    _count("opened")
    with container:
        if _video_stream(container) is None:
            raise BnfixError(
                "no video stream (only an attached cover picture)"
                if container.streams.video
                else "no video stream"
            )
        yield _Video(container, Path(path))


def _video_stream(container: Any) -> Any | None:
    """The first video stream that is a video: FFmpeg lists an MP3's or M4A's cover art (and
    a Matroska cover attachment) as a one-frame video stream with the attached_pic flag."""
    import av

    cover = av.stream.Disposition.attached_pic
    return next((s for s in container.streams.video if not s.disposition & cover), None)


def _scan_duration(path: Path) -> float | None:
    """The video stream's end from its packets' timestamps (no decoding)."""
    try:
        with open_input(path) as container:
            stream = _video_stream(container)
            start = stream.start_time or 0
            end = None
            for packet in container.demux(stream):
                if packet.pts is None:
                    continue
                stop = packet.pts + (packet.duration or 0)
                end = stop if end is None else max(end, stop)
            return None if end is None else float((end - start) * stream.time_base)
    except Exception:  # the decode pass reports the damage in its own words
        return None


class _Converter:
    """RGB arrays of the chosen frames, converted as soon as chosen (holding decoded frames
    instead would keep one raw picture per sample in memory), all at the first one's coded
    size at its display width (non-square pixels made square), turned upright. Times arrive
    in order, so a frame chosen twice is chosen twice in a row and converted once."""

    def __init__(self, video: _Video) -> None:
        self.video = video
        self.size: tuple[int, int] | None = None
        self._last: tuple[Any, np.ndarray] | None = None
        self._reformatter: Any = None  # one scaler context for all frames (~2 ms each to build)

    def add(self, chosen: _Frame) -> np.ndarray:
        frame = chosen.frame
        if self._last is not None and self._last[0] is frame:
            return self._last[1]
        if self.size is None:
            self.size = (self.video.display_width(frame.width), frame.height)
        width, height = self.size
        if self._reformatter is None:
            from av.video.reformatter import VideoReformatter

            self._reformatter = VideoReformatter()
        try:
            rgb = self._reformatter.reformat(
                frame, width=width, height=height, format="rgb24"
            ).to_ndarray()
        except Exception as e:  # a frame the scaler refuses (exotic pixel formats)
            raise BnfixError(f"cannot convert video frame: {reason(e)}") from e
        turns = _clockwise(frame) // 90
        if turns:
            rgb = np.rot90(rgb, k=-turns, axes=(0, 1))
        rgb = np.ascontiguousarray(rgb)
        self._last = (frame, rgb)
        return rgb


def _stack(frames: list[np.ndarray]) -> torch.Tensor:
    """``[T, H, W, 3]`` arrays to uint8 ``[T, 3, H, W]``.

    The transpose is numpy's: a torch copy would run on torch's OpenMP pool, which deadlocks in
    a forked worker whose parent had used it (libgomp is not fork-safe), and decoding in forked
    workers is the point of this module.
    """
    return torch.from_numpy(np.ascontiguousarray(np.stack(frames).transpose(0, 3, 1, 2)))
