"""bnfix.media on real files encoded here with PyAV: H.264/AAC .mp4, VP9/Opus .webm, MPEG-4 .avi,
compressed audio, rotation metadata, truncated and empty files.

Every synthetic frame carries its own number in binary (bnfix.media.synth.pattern), so "the
frame shown at t" is checked by content, not by the timestamps under test.
"""

from __future__ import annotations

import fractions
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F

from bnfix import probe_audio
from bnfix.errors import BnfixError
from bnfix.media import (
    AUDIO_EXTENSIONS,
    IMAGE_EXTENSIONS,
    VIDEO_EXTENSIONS,
    decode_stats,
    media_kind,
    read_audio,
    read_frames,
    read_frames_at_fps,
    read_segments,
    reset_decode_stats,
    segment_times,
    video_info,
)
from bnfix.media.synth import frame_index, pattern, write_audio, write_video
from bnfix.probe_audio import AudioOptions, features_with_length

FPS = 25
RATE = 48000  # the audio tracks' rate: the features resample it to 16 kHz
H264 = {"codec": "libx264", "options": {"crf": "12"}, "gop": 25}
VP9 = {"codec": "libvpx-vp9", "options": {"crf": "20", "b:v": "0", "deadline": "realtime"}}
MPEG4 = {"codec": "mpeg4", "options": {"qscale": "2"}}
# Mean |decoded - source| per pixel, in 8-bit levels. A lossless H.264 (qp 0) of the same
# frames already differs by 1.86: the RGB -> YUV 4:2:0 -> RGB round trip blurs the colour
# edges. H.264 crf 12 and VP9 crf 20 measure 2.05 and 2.26, MPEG-4 qscale 2 3.9 (max 5.6 on a
# frame): the bounds leave ~1 level (~2 for MPEG-4) of codec error on top of the round trip.
MAD_BOUND = {"h264.mp4": 3.0, "vp9.webm": 3.0, "mpeg4.avi": 6.5}


def wave_at(seconds: float, rate: int = RATE) -> np.ndarray:
    """``[2, samples]`` test sound: a chirp, a gated 1 kHz tone and a noise floor."""
    n = round(seconds * rate)
    t = np.arange(n) / rate
    rng = np.random.default_rng(0)
    chirp = 0.2 * np.sin(2 * np.pi * (300 * t + 400 * t**2))
    gated = 0.1 * np.sin(2 * np.pi * 1000 * t) * (np.sin(2 * np.pi * 3 * t) > 0)
    mono = chirp + gated + 0.02 * rng.standard_normal(n)
    return np.stack([mono, 0.8 * mono]).astype(np.float32)


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    """The files every test reads (about 0.8 s to encode, AAC being most of it)."""
    root = tmp_path_factory.mktemp("media")
    sound = wave_at(3.0)
    write_video(root / "h264.mp4", 3.0, **H264, audio=sound, audio_codec="aac")
    write_video(root / "vp9.webm", 2.0, **VP9, audio=sound[:, : 2 * RATE], audio_codec="libopus")
    write_video(root / "mpeg4.avi", 2.0, **MPEG4)
    write_video(root / "silent.mp4", 1.0, **H264)
    write_video(root / "rotated.mp4", 1.0, **H264, width=64, height=48, rotation=90)
    write_video(root / "long.mp4", 10.0, **H264)  # GOP 25: a keyframe every second
    # index (moov) first, lossless so the frames, not the index, fill the file: cut in half,
    # it still opens and holds the first half of its frames
    faststart = {"movflags": "faststart"}
    lossless = {**H264, "options": {"qp": "0"}}
    write_video(root / "indexed_first.mp4", 3.0, **lossless, container_options=faststart)
    write_audio(root / "sound.mp3", sound[:, : 2 * RATE], RATE, "mp3")
    sf.write(root / "sound.wav", sound[:, : 2 * RATE].T, RATE, subtype="FLOAT")
    whole = (root / "h264.mp4").read_bytes()
    (root / "truncated.mp4").write_bytes(whole[: len(whole) // 2])  # index (moov) at the end
    first = (root / "indexed_first.mp4").read_bytes()
    (root / "truncated_indexed.mp4").write_bytes(first[: len(first) // 2])
    (root / "empty.mp4").write_bytes(b"")
    return root


def test_media_kind_by_lower_cased_extension() -> None:
    assert media_kind(Path("a/CLIP.MP4")) == "video" and media_kind(Path("x.webm")) == "video"
    assert media_kind(Path("s.Opus")) == "audio" and media_kind(Path("s.m4a")) == "audio"
    assert media_kind(Path("f.jpeg")) == "image" and media_kind(Path("t.pt")) is None
    assert {".wav", ".flac", ".ogg", ".mp3", ".m4a", ".aac", ".opus"} <= set(AUDIO_EXTENSIONS)
    assert {".mp4", ".mkv", ".webm", ".avi", ".mov", ".ts", ".m2ts", ".vob", ".3gp"} <= set(
        VIDEO_EXTENSIONS
    )
    from bnfix import probe

    assert probe.IMAGE_EXTENSIONS == IMAGE_EXTENSIONS  # moved, still importable
    assert not set(AUDIO_EXTENSIONS) & set(VIDEO_EXTENSIONS)


def test_segment_times_are_centres() -> None:
    assert segment_times(3.0, 3) == [0.5, 1.5, 2.5]
    assert segment_times(10.0, 1) == [5.0]
    with pytest.raises(ValueError):
        segment_times(1.0, 0)


@pytest.mark.parametrize("name", ["h264.mp4", "vp9.webm", "mpeg4.avi"])
def test_every_frame_decodes_to_its_source(media: Path, name: str) -> None:
    info = video_info(media / name)
    seconds = 3.0 if name == "h264.mp4" else 2.0
    assert info.fps == FPS and (info.width, info.height) == (64, 48) and info.rotation == 0
    assert math.isclose(info.duration, seconds, abs_tol=0.05)  # webm states 2.008 s
    assert info.has_audio == (name != "mpeg4.avi")
    frames = read_frames_at_fps(media / name, FPS)
    count = round(seconds * FPS)
    assert frames.dtype == torch.uint8 and frames.shape == (count, 3, 48, 64)
    assert [frame_index(f.numpy()) for f in frames] == list(range(count))
    source = torch.from_numpy(np.stack([pattern(i, FPS) for i in range(count)]))
    mad = (frames.permute(0, 2, 3, 1).double() - source.double()).abs().mean()
    assert mad < MAD_BOUND[name], float(mad)


@pytest.mark.parametrize("name", ["h264.mp4", "vp9.webm", "mpeg4.avi"])
def test_frames_at_segment_centres_are_the_frames_shown_then(media: Path, name: str) -> None:
    duration = video_info(media / name).duration
    for count in (1, 3, 8):
        times = segment_times(duration, count)
        got = [frame_index(f.numpy()) for f in read_frames(media / name, times)]
        assert got == [math.floor(t * FPS + 1e-6) for t in times], (count, times)
    # any order, repeats, before the first frame and past the end
    times = [1.5, -1.0, 0.0, 1.5, 0.04, 0.0399, 99.0]
    got = [frame_index(f.numpy()) for f in read_frames(media / name, times)]
    last = round(2.0 * FPS) - 1 if name != "h264.mp4" else 3 * FPS - 1
    assert got == [37, 0, 0, 37, 1, 0, last]


def test_fps_sampling_and_max_frames(media: Path) -> None:
    frames = read_frames_at_fps(media / "h264.mp4", 2.0)  # t = 0.25, 0.75, ..., 2.75
    assert [frame_index(f.numpy()) for f in frames] == [6, 18, 31, 43, 56, 68]
    capped = read_frames_at_fps(media / "h264.mp4", 2.0, max_frames=2)
    assert torch.equal(capped, frames[:2])
    assert read_frames_at_fps(media / "silent.mp4", 0.1).shape[0] == 1  # F >= 1
    with pytest.raises(ValueError):
        read_frames_at_fps(media / "h264.mp4", 0.0)


def test_seeking_decodes_a_fraction_of_a_long_clip(media: Path) -> None:
    """10 s, 250 frames, a keyframe every 25: three segment centres need three seeks and about
    half a GOP each, not the 250 frames a decode from the start would cost (~210 to reach
    t = 8.33 s)."""
    times = segment_times(10.0, 3)  # 1.67, 5, 8.33 s
    reset_decode_stats()
    frames = read_frames(media / "long.mp4", times)
    stats = decode_stats()
    assert [frame_index(f.numpy()) for f in frames] == [41, 125, 208]
    assert stats["seeks"] == 3 and stats["frames_decoded"] <= 3 * 25 + 10, stats
    # close times inside one GOP: decoded on, no second seek
    reset_decode_stats()
    frames = read_frames(media / "long.mp4", [5.1, 5.3, 5.5])
    assert [frame_index(f.numpy()) for f in frames] == [127, 132, 137]
    assert decode_stats()["seeks"] == 1
    # the whole clip sequentially, for comparison
    reset_decode_stats()
    assert read_frames_at_fps(media / "long.mp4", 1.0).shape[0] == 10
    assert decode_stats()["frames_decoded"] >= 238 and decode_stats()["seeks"] == 0


def test_one_keyframe_is_decoded_through_once_not_sought_again(tmp_path: Path) -> None:
    """ffmpeg's default keyint (250) gives a 10-s clip one keyframe: seeking back to it for
    each time would decode the start of the clip over and over (once 293 frames of 250)."""
    path = tmp_path / "onekey.mp4"
    write_video(path, 10, gop=250, options={"crf": "18"})
    reset_decode_stats()
    frames = read_frames(path, segment_times(10.0, 3))
    assert [frame_index(f.numpy()) for f in frames] == [41, 125, 208]
    stats = decode_stats()
    assert stats["seeks"] == 0 and stats["frames_decoded"] <= 210, stats


def test_a_dropped_b_frame_that_is_the_answer_is_decoded_again(tmp_path: Path) -> None:
    """Catching up to a far time drops non-reference frames. In a variable-rate video whose
    frame 29 (a non-reference B-frame: fixed IBBBP pattern, no B-pyramid) is followed by a
    1.2 s gap, the frame shown at 1.8 s is that B-frame, 0.64 s before the target: the skip
    guard must notice and decode again without dropping."""
    stamps = [*range(30), *range(60, 90)]  # frames 30.. start at 2.4 s
    x264 = "bframes=3:b-adapt=0:b-pyramid=none:keyint=250:scenecut=0"
    path = tmp_path / "vfr.mp4"
    options = {"crf": "12", "x264-params": x264}
    write_video(path, 0, codec="libx264", options=options, timestamps=stamps)
    import av
    from av.video.frame import PictureType

    with av.open(str(path)) as container:
        decoded = list(container.decode(video=0))
        kinds = {frame_index(f.to_ndarray(format="rgb24")): PictureType(f.pict_type).name
                 for f in decoded}  # fmt: skip
    assert kinds[29] == "B" and kinds[0] == "I"
    reset_decode_stats()
    frames = read_frames(path, [1.0, 1.8, 2.5])
    assert [frame_index(f.numpy()) for f in frames] == [25, 29, 32]  # 32: from 2.48 s
    assert decode_stats()["seeks"] == 1  # the redo


def test_rotation_metadata_is_honoured(media: Path) -> None:
    """Stored 48x64 (portrait) with a display matrix turning it back to 64x48 landscape."""
    info = video_info(media / "rotated.mp4")
    assert (info.width, info.height) == (64, 48) and info.rotation == 270
    frames = read_frames(media / "rotated.mp4", [0.5])
    assert frames.shape == (1, 3, 48, 64)
    assert frame_index(frames[0].numpy()) == 12  # the bit band reads only when upright
    source = torch.from_numpy(pattern(12, FPS)).permute(2, 0, 1)
    assert (frames[0].double() - source.double()).abs().mean() < 3.0


@pytest.mark.parametrize(("name", "bound"), [("h264.mp4", 0.5), ("vp9.webm", 0.4)])
def test_audio_track_features_match_the_source_wave(media: Path, name: str, bound: float) -> None:
    """The track's 16 kHz log-mel frames against the source's. Measured mean |diff| (natural
    log power, over bins within 12 nats of the peak, i.e. ~52 dB): AAC 0.35, Opus 0.22.
    Delaying the source by 30 ms gives > 1.0, so the bound checks the alignment too (the
    codecs' priming samples are dropped)."""
    opts = AudioOptions(target_frames=190)  # 1.9 s
    wave, rate = read_audio(media / name, opts)
    assert rate == RATE and wave.shape[0] == 2 and wave.dtype == torch.float32
    source = torch.from_numpy(wave_at(2.0))
    ref, frames = features_with_length(source, RATE, opts)
    got, got_frames = features_with_length(wave, rate, opts)
    assert got_frames == frames == 190
    live = ref > ref.max() - 12
    diff = (got - ref).abs()[live].mean()
    late = torch.nn.functional.pad(source, (round(0.03 * RATE), 0))
    shifted = (features_with_length(late, RATE, opts)[0] - ref).abs()[live].mean()
    assert diff < bound and shifted > 1.0, (float(diff), float(shifted))


def test_compressed_audio_files_and_the_probe_audio_entry_point(media: Path) -> None:
    opts = AudioOptions(target_frames=100)
    mp3, rate = read_audio(media / "sound.mp3", opts)
    wav, wav_rate = probe_audio.read_audio(media / "sound.wav", opts)  # soundfile, as before
    assert rate == wav_rate == RATE and mp3.shape == wav.shape
    ref = features_with_length(wav, rate, opts)[0]
    got = features_with_length(mp3, rate, opts)[0]
    live = ref > ref.max() - 12
    assert (got - ref).abs()[live].mean() < 0.6  # MP3 at its default 128 kb/s; gapless
    assert torch.equal(probe_audio.read_audio(media / "sound.mp3", opts)[0], mp3)
    # only the prefix the features need is decoded
    short = AudioOptions(target_frames=10)
    assert read_audio(media / "h264.mp4", short)[0].shape[1] < RATE // 5


def test_bad_files_are_one_line_errors_and_ffmpeg_stays_quiet(media: Path, capfd) -> None:
    opts = AudioOptions(target_frames=50)
    cases = [
        (lambda: read_audio(media / "silent.mp4", opts), "^no audio track$"),
        (lambda: video_info(media / "sound.mp3"), "^no video stream$"),
        (lambda: read_frames(media / "empty.mp4", [0.0]), "^cannot open video: Invalid data"),
        (lambda: read_audio(media / "empty.mp4", opts), "^cannot decode audio: Invalid data"),
        (lambda: video_info(media / "truncated.mp4"), "^cannot open video: "),
        (
            lambda: read_frames(media / "truncated_indexed.mp4", [2.5]),
            r"^truncated video: frames stop at [0-9.]+ s of its stated 3.00 s$",
        ),
    ]
    for call, pattern_ in cases:
        with pytest.raises(BnfixError, match=pattern_) as err:
            call()
        assert "\n" not in str(err.value) and err.value.path is None
    # the part before the cut still reads
    assert frame_index(read_frames(media / "truncated_indexed.mp4", [0.2])[0].numpy()) == 5
    out, errors = capfd.readouterr()
    assert out == "" and errors == ""


def _frames_digest(path: str) -> list[int]:
    return [frame_index(f.numpy()) for f in read_frames(Path(path), segment_times(10.0, 4))]


# Run as its own process, as the CLI runs: decode on threads, bring torch's OpenMP pool up with
# two threads, then fork extraction's workers (bnfix.fusion.extract._pool, the real one) and
# decode in them. Forking from the pytest-xdist worker instead would fork a process whose
# execnet I/O thread (started with _thread, invisible to `threading`) may hold a lock at that
# moment; a CI run once timed out there with no way to tell a hung child from a killed one.
_FORKED_DECODE = """
import json, sys
from concurrent.futures import ThreadPoolExecutor
import torch
from bnfix.fusion.extract import _pool
from test_media import _frames_digest

class Decode:
    kind = "visual"
    def prepare(self):
        pass

path = sys.argv[1]
with ThreadPoolExecutor(4) as threads:
    threaded = list(threads.map(_frames_digest, [path] * 8))
torch.set_num_threads(2)
torch.ones(1 << 22).mul_(2).sum()
with _pool(Decode(), 2) as pool:
    forked = [f.result(timeout=60) for f in [pool.submit(_frames_digest, path) for _ in range(4)]]
    one_thread = pool.submit(torch.get_num_threads).result(timeout=60)
print(json.dumps({"threaded": threaded, "forked": forked, "one_thread": one_thread}))
"""


def test_decoding_is_thread_safe_and_runs_in_extraction_workers(media: Path) -> None:
    """Threads share nothing; extraction's forked workers decode after their parent decoded
    on threads and ran torch's OpenMP pool (each worker is on one torch thread first)."""
    path = str(media / "long.mp4")
    expected = _frames_digest(path)
    assert expected == [31, 93, 156, 218]
    tests = Path(__file__).parent
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tests), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, "-c", _FORKED_DECODE, path],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result == {"threaded": [expected] * 8, "forked": [expected] * 4, "one_thread": 1}


# --- the other codecs and containers users' datasets come in -----------------------------------

SECONDS = 4.0
#: name: (encoder settings, audio codec, audio rate). Default GOPs (one keyframe in 4 s for
#: most), so reads at later times catch up over many frames, where dropping non-reference
#: frames matters; a moving texture so the encoders use their full reference structures.
CODECS = {
    "h264.mkv": ({"codec": "libx264", "options": {"crf": "18"}}, "aac", 48000),
    "hevc.mp4": (
        {"codec": "libx265", "options": {"crf": "18", "x265-params": "log-level=none"}}, None, 0
    ),
    "av1.webm": ({"codec": "libsvtav1", "options": {"crf": "30"}}, None, 0),
    "av1.mp4": ({"codec": "libsvtav1", "options": {"crf": "30"}}, None, 0),
    "vp8.webm": (
        {"codec": "libvpx", "options": {"crf": "10", "b:v": "1M", "auto-alt-ref": "1",
                                        "lag-in-frames": "16"}},
        "libopus", 48000,
    ),
    # B-frames in AVI, which stores no presentation times (FFmpeg rebuilds them)
    "mpeg4_bframes.avi": ({"codec": "mpeg4", "options": {"qscale": "3", "bf": "2"}}, None, 0),
    # CREMA-D's VideoFlash layout: Sorenson H.263 video with MP3 audio at 44.1 kHz
    "flv1.flv": ({"codec": "flv", "options": {"qscale": "3"}}, "libmp3lame", 44100),
    # no index: seeks search by timestamp and land between keyframes
    "h264.ts": ({"codec": "libx264", "options": {"crf": "18"}}, "aac", 48000),
    # no cues (a live recording's Matroska), and fragmented MP4 (DASH downloads): no index
    # up front either
    "h264_nocues.mkv": (
        {"codec": "libx264", "options": {"crf": "18"}, "container_options": {"live": "1"}},
        None, 0,
    ),
    "h264_fragmented.mp4": (
        {"codec": "libx264", "options": {"crf": "18"}, "gop": 50,
         "container_options": {"movflags": "frag_keyframe+empty_moov"}},
        "aac", 48000,
    ),
    # MPEG-2 program stream, open GOPs with B-frames: decoded straight through
    "mpeg2_bframes.mpg": ({"codec": "mpeg2video", "options": {"qscale": "3", "bf": "2"}}, None, 0),
}  # fmt: skip


@pytest.fixture(scope="module")
def codecs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("codecs")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SVT_LOG", "1")  # SVT-AV1's encoder banner: errors only
        for name, (video, audio_codec, rate) in CODECS.items():
            sound = wave_at(SECONDS, rate) if audio_codec else None
            write_video(
                root / name, SECONDS, texture=0.3, audio=sound, audio_rate=rate or RATE,
                audio_codec=audio_codec, **video,
            )  # fmt: skip
    return root


def _shown(path: Path) -> tuple[list[float], list[int]]:
    """Every frame's time and pattern number, from one plain decode with PyAV: the truth."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        start = stream.start_time or 0
        frames = [
            (float((f.pts - start) * stream.time_base), frame_index(f.to_ndarray(format="rgb24")))
            for f in container.decode(stream)
        ]
    return [t for t, _ in frames], [i for _, i in frames]


@pytest.mark.parametrize("name", list(CODECS))
def test_each_codec_reads_the_frame_a_full_decode_shows(codecs: Path, name: str) -> None:
    """At ~90 times (frame starts, mid-frame, random), read alone (a fresh decoder catching
    up from the keyframe, dropping non-reference frames where that is safe) and all at once:
    the frame a plain decode of every frame shows then. AV1 failed this in 40% of reads
    while libdav1d dropped non-reference frames."""
    times, shown = _shown(codecs / name)
    assert len(shown) == round(SECONDS * FPS) and sorted(shown) == list(range(len(shown)))
    rng = np.random.default_rng(1)
    asked = sorted(
        {k / FPS for k in range(0, 100, 3)} | {(k + 0.5) / FPS for k in range(1, 100, 4)}
        | set(rng.uniform(0, SECONDS, 25).round(4)) | set(segment_times(SECONDS, 3))
    )  # fmt: skip
    expected = [shown[max(0, np.searchsorted(times, t + 1e-6) - 1)] for t in asked]
    alone = [frame_index(read_frames(codecs / name, [t])[0].numpy()) for t in asked]
    together = [frame_index(f.numpy()) for f in read_frames(codecs / name, asked)]
    assert alone == expected
    assert together == expected


@pytest.mark.parametrize("name", list(CODECS))
def test_each_codec_states_its_duration_and_decodes_every_frame_at_its_rate(
    codecs: Path, name: str
) -> None:
    """The video track's own duration (Matroska/WebM tag it per track; FLV states only the
    container's, here its audio's 4.025 s), and at the video's rate each frame exactly once:
    a container duration stretched by a longer audio track no longer repeats the last frame.

    AVI with B-frames is the exception FFmpeg's timing makes: having no presentation times,
    its frames are timed one period late (frame 0 from 0.04 s), so sampling at t = 0.02,
    0.06, ... sees frame 0 twice and ends on frame 98 — what a player shows at those times."""
    info = video_info(codecs / name)
    assert info.fps == FPS and (info.width, info.height) == (64, 48)
    assert abs(info.duration - SECONDS) < (0.03 if name == "flv1.flv" else 1e-3), info.duration
    got = [frame_index(f.numpy()) for f in read_frames_at_fps(codecs / name, FPS)]
    count = round(SECONDS * FPS)
    if name == "mpeg4_bframes.avi":
        assert got == [0, *range(count - 1)]
    else:
        assert got == list(range(count))


@pytest.mark.parametrize(
    ("name", "delay"),
    [("h264.mkv", 0), ("flv1.flv", 1105), ("h264.ts", 1024), ("h264_fragmented.mp4", 1024)],
)
def test_audio_tracks_of_other_containers_match_their_source(
    codecs: Path, name: str, delay: int
) -> None:
    """Mean |log-mel diff| to the source, as for MP4/WebM above. FLV has no field for MP3's
    encoder delay (LAME's 1105 samples), MPEG-TS and a fragmented MP4 (no edit list) none
    for AAC's (FFmpeg's encoder primes 1024), so those tracks start that late, as FFmpeg reads
    them anywhere; against the source delayed by it the match is as close as elsewhere."""
    rate = CODECS[name][2]
    opts = AudioOptions(target_frames=300)  # 3 s
    wave, got_rate = read_audio(codecs / name, opts)
    assert got_rate == rate and wave.shape[0] == 2
    source = torch.nn.functional.pad(torch.from_numpy(wave_at(SECONDS, rate)), (delay, 0))
    ref = features_with_length(source, rate, opts)[0]
    got = features_with_length(wave, rate, opts)[0]
    live = ref > ref.max() - 12
    assert (got - ref).abs()[live].mean() < 0.6


def test_matroska_starting_late_is_read_from_its_first_frame_for_its_length(
    tmp_path: Path,
) -> None:
    """Matroska states where a stream ends (segment Duration, FFmpeg's DURATION tag), not how
    long it is: the 2nd 4-s piece of FFmpeg's segment muxer (frames from 4 s to 8 s) read as
    8 s long, so its middle frame was its last and 3 segments called it truncated. Same for
    a WebM whose frames start at 5 s. Each now lasts 4 s and gives the frames shown then."""
    import av

    fps = 10
    with av.open(str(tmp_path / "piece_%d.mkv"), "w", format="segment",
                 options={"segment_time": "4", "segment_format": "matroska"}) as out:  # fmt: skip
        video = out.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        video.options = {"g": "10", "bf": "0"}
        for i in range(12 * fps):
            frame = av.VideoFrame.from_ndarray(pattern(i, fps), format="rgb24")
            frame.pts = i
            out.mux(video.encode(frame))
        out.mux(video.encode())
    late = tmp_path / "late.webm"
    write_video(late, 0, fps=fps, codec="libvpx-vp9", timestamps=range(5 * fps, 9 * fps))
    cases = [(tmp_path / "piece_1.mkv", 40), (tmp_path / "piece_2.mkv", 80), (late, 0)]
    for path, first in cases:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            assert float(stream.start_time * stream.time_base) >= 4.0  # starts late indeed
        assert video_info(path).duration == pytest.approx(4.0, abs=0.11)
        assert [frame_index(f.numpy()) for f in read_segments(path, 3)] == [
            first + 6,
            first + 20,
            first + 33,
        ]
        assert frame_index(read_segments(path, 1)[0].numpy()) == first + 20


def test_a_cover_picture_is_not_taken_for_the_video(tmp_path: Path) -> None:
    """FFmpeg lists an audio file's cover art as a one-frame video stream (flag attached_pic):
    an audio-only .mp4 with a cover was decoded as a video, called truncated at 2 s, and one
    under half a second would have passed as a still video."""
    import av
    from PIL import Image

    path = tmp_path / "song.mp4"
    cover = io.BytesIO()
    Image.fromarray(np.full((48, 64, 3), (255, 0, 255), np.uint8)).save(cover, "PNG")
    with av.open(str(path), "w") as out:
        picture = out.add_stream("png")
        picture.width, picture.height, picture.pix_fmt = 64, 48, "rgb24"
        picture.disposition = av.stream.Disposition.attached_pic
        sound = out.add_stream("aac", rate=RATE)
        sound.layout = "mono"
        packet = av.Packet(cover.getvalue())
        packet.stream, packet.pts, packet.dts = picture, 0, 0
        packet.time_base = fractions.Fraction(1, 90000)
        out.mux(packet)
        wave = wave_at(2.0)[:1].astype(np.float32)
        for k in range(0, wave.shape[1], 1024):
            frame = av.AudioFrame.from_ndarray(wave[:, k : k + 1024], format="flt", layout="mono")
            frame.sample_rate, frame.pts = RATE, k
            out.mux(sound.encode(frame))
        out.mux(sound.encode())
    with av.open(str(path)) as container:  # the cover is there, as a video stream
        assert [s.type for s in container.streams] == ["audio", "video"]
    for read in (video_info, lambda p: read_segments(p, 3)):
        with pytest.raises(BnfixError, match=r"^no video stream \(only an attached cover"):
            read(path)
    wave, rate = read_audio(path, AudioOptions(target_frames=100))
    assert rate == RATE and wave.shape[-1] > RATE  # its audio reads as before


@pytest.mark.parametrize(
    ("codec", "name"), [("libx264", "anamorphic.mkv"), ("mpeg2video", "dvd.mpg")]
)
def test_non_square_pixels_are_shown_at_the_pictures_proportions(
    tmp_path: Path, codec: str, name: str
) -> None:
    """DV, HDV, DVD and broadcast video store pixels wider than tall (1440 x 1080 shown as
    1920 x 1080): frames came back at the raster's size, squashed, and fusion recorded the
    raster's aspect. 48 x 48 stored with pixels 4:3 wide is a 64 x 48 picture (4:3, which
    MPEG-2 can state)."""
    import av

    path = tmp_path / name
    fps = 10
    with av.open(str(path), "w") as out:
        video = out.add_stream(codec, rate=fps)
        video.width, video.height, video.pix_fmt = 48, 48, "yuv420p"
        video.codec_context.sample_aspect_ratio = fractions.Fraction(4, 3)
        for i in range(20):
            frame = av.VideoFrame.from_ndarray(pattern(i, fps, 48, 48), format="rgb24")
            frame.pts = i
            out.mux(video.encode(frame))
        out.mux(video.encode())
    with av.open(str(path)) as container:
        assert container.streams.video[0].sample_aspect_ratio == fractions.Fraction(4, 3)
    info = video_info(path)
    assert (info.width, info.height) == (64, 48)
    frames = read_frames(path, [0.05, 1.05])
    assert tuple(frames.shape) == (2, 3, 48, 64)
    assert [frame_index(f.numpy()) for f in frames] == [0, 10]
    # the stored frame, widened
    stored = torch.from_numpy(pattern(0, fps, 48, 48)).permute(2, 0, 1).float()
    widened = F.interpolate(stored[None], size=(48, 64), mode="bilinear")[0]
    assert (frames[0].float() - widened).abs().mean() < 12
