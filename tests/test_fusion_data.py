"""Manifest reading and the feature cache, on real small WAV, PNG and JPEG files."""

from __future__ import annotations

import io
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import rich.console
import soundfile as sf
import torch
from PIL import Image

from bnfix.errors import BnfixError
from bnfix.fusion.features import FeatureSet, VisualOptions, frame_indices, load_features
from bnfix.fusion.manifest import Manifest, read_manifest
from bnfix.probe_audio import AudioOptions, features_with_length, read_audio

AUDIO = AudioOptions(num_mel_bins=32, target_frames=128)  # 1 s clips: 98 real frames + padding
VISUAL = VisualOptions(frames=3, size=28)  # cached squares of round(28 * 8 / 7) = 32 px
HEADER = "id,audio,frames,label,split"


def _wav(path: Path, seed: int, seconds: float = 1.0, rate: int = 16000, channels: int = 1):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    tone = 0.3 * np.sin(2 * np.pi * (200 + 50 * seed) * t)
    wave = tone[:, None] + 0.05 * rng.standard_normal((t.size, channels))
    sf.write(str(path), wave.astype(np.float32), rate, subtype="PCM_16")


def _frames(folder: Path, seed: int, count: int = 4, suffix: str = ".jpg") -> None:
    """Frames named frame_1, frame_2, ..., frame_10 (no zero padding: natural order matters)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for k in range(1, count + 1):
        pixels = rng.integers(0, 256, (36, 44, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"frame_{k}{suffix}")


def _write(path: Path, rows: list[str], header: str = HEADER) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """Six samples (4 train, 1 val, 1 test); s1 is stereo at 22.05 kHz, s5's frames one image."""
    data = tmp_path / "data"
    (data / "audio").mkdir(parents=True)
    rows = []
    splits = ["train", "train", "train", "train", "val", "test"]
    for i, split in enumerate(splits):
        rate, channels = (22050, 2) if i == 1 else (16000, 1)
        _wav(data / "audio" / f"s{i}.wav", i, rate=rate, channels=channels)
        if i == 5:
            Image.fromarray(np.full((30, 50, 3), 90, np.uint8)).save(data / "still.png")
            frames = "still.png"
        else:
            _frames(data / "visual" / f"s{i}", i, count=4 + i)
            frames = f"visual/s{i}"
        rows.append(f"s{i},audio/s{i}.wav,{frames},{['dog', 'cat', 'bird'][i % 3]},{split}")
    return _write(data / "manifest.csv", rows)


def _console() -> tuple[rich.console.Console, io.StringIO]:
    out = io.StringIO()
    return rich.console.Console(file=out, width=300, color_system=None), out


def _load(manifest: Manifest, cache: Path, audio: AudioOptions = AUDIO, **kw) -> FeatureSet:
    console, _ = _console()
    kw.setdefault("workers", 1)  # one process: cheap in tests (two are tested once)
    return load_features(manifest, audio, kw.pop("visual", VISUAL), cache, console, **kw)


# --- manifest ----------------------------------------------------------------------------------


def test_manifest_reads_paths_labels_and_splits(dataset: Path) -> None:
    m = read_manifest(dataset)
    assert m.modalities == ("audio", "visual")
    assert m.classes == ["bird", "cat", "dog"]
    assert [s.label for s in m.samples] == [2, 1, 0, 2, 1, 0]
    assert [s.id for s in m.split("train")] == ["s0", "s1", "s2", "s3"]
    assert [s.id for s in m.split("test")] == ["s5"]
    s0 = m.samples[0]
    assert s0.audio == (dataset.parent / "audio" / "s0.wav").resolve() and s0.audio.is_absolute()
    assert s0.frames == (dataset.parent / "visual" / "s0").resolve()
    assert m.samples[5].frames == (dataset.parent / "still.png").resolve()


def test_manifest_integer_labels_absolute_paths_and_no_val(dataset: Path, tmp_path: Path) -> None:
    wav = (dataset.parent / "audio" / "s0.wav").resolve()
    rows = [f"a,{wav},,7,train", f"b,{wav},,2,train", f"c,{wav},,0,TEST"]
    m = read_manifest(_write(tmp_path / "ints.csv", rows))
    assert m.classes == ["0", "2", "7"]  # dense indices, in the labels' integer order
    assert [s.label for s in m.samples] == [2, 1, 0]
    assert m.split("val") == [] and m.samples[2].split == "test"
    assert m.modalities == ("audio",) and m.samples[0].frames is None


@pytest.mark.parametrize(
    ("header", "row", "fragments"),
    [
        (HEADER, "x,audio/nope.wav,visual/s0,dog,train", ["row 2 (line 3)", "'audio'", "nope.wav"]),
        (HEADER, "x,audio/s0.wav,visual/nope,dog,train", ["row 2", "'frames'", "no such"]),
        (HEADER, "x,audio,visual/s0,dog,train", ["row 2", "'audio'", "is a folder"]),
        (HEADER, "x,audio/s0.wav,visual/s0,dog,dev", ["row 2", "'split'", "'dev'"]),
        (HEADER, "s0,audio/s1.wav,visual/s1,dog,train", ["row 2", "'id'", "duplicate", "row 1"]),
        (HEADER, "x,audio/s1.wav,visual/s1,,train", ["row 2", "'label'", "empty label"]),
        (HEADER, ",audio/s1.wav,visual/s1,dog,train", ["row 2", "'id'", "empty id"]),
        (HEADER, "x,,visual/s1,dog,train", ["row 2", "'audio'", "empty", "row 1"]),
        (HEADER, "x,audio/s1.wav,visual/s1,dog", ["row 2", "4 fields", "header has 5"]),
        ("id,audio,frames,split", "x,audio/s1.wav,visual/s1,train", ["line 1", "'label'"]),
        ("id,label,split", "x,dog,train", ["line 1", "'audio', 'frames' or 'video'"]),
        ("id,audio,audio,label,split", "x,a,b,dog,train", ["line 1", "'audio'", "more than once"]),
    ],
)
def test_manifest_errors_name_row_and_column(
    dataset: Path, header: str, row: str, fragments: list[str]
) -> None:
    first = "s0,audio/s0.wav,visual/s0,dog,train" if header == HEADER else None
    rows = [first, row] if first else [row]
    path = _write(dataset.parent / "bad.csv", rows, header)
    with pytest.raises(BnfixError) as info:
        read_manifest(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(path))
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_manifest_cells_resolve_exactly_as_path_resolve_does(tmp_path: Path) -> None:
    """The manifest resolves each folder once and a file by one lstat; what it gives must be
    ``Path.resolve()``'s answer and existence, through every kind of symlink and ``..``."""
    from bnfix.fusion.manifest import _Paths

    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    (root / "a").mkdir(parents=True)
    (elsewhere / "b").mkdir(parents=True)
    for f in (root / "a" / "x.wav", elsewhere / "b" / "y.wav", elsewhere / "z.wav"):
        f.write_bytes(b"")
    (root / "linked").symlink_to(elsewhere / "b")  # a symlinked folder
    (root / "a" / "to_z.wav").symlink_to(elsewhere / "z.wav")  # a symlinked file
    (root / "a" / "broken.wav").symlink_to(root / "gone.wav")
    (root / "a" / "up").symlink_to(elsewhere / "b")  # then ".." leaves the link's target
    cells = [
        "a/x.wav", "a/./x.wav", "linked/y.wav", "a/to_z.wav", "a/broken.wav", "a/missing.wav",
        "a/up/../z.wav", "a/../a/x.wav", "a", "linked", "a/..", str(root / "a" / "x.wav"),
        "nowhere/at/all.wav", "a/x.wav/", "/",
    ]  # fmt: skip
    paths = _Paths(root)
    for cell in cells + cells:  # the second pass reads the folder cache
        expected = (root / cell).resolve()
        got, st = paths.real(cell)
        assert got == expected, cell
        assert (st is not None) == expected.exists(), cell
        if st is not None:
            assert os.path.samestat(st, os.stat(expected)), cell


def test_manifest_errors_about_the_whole_file(dataset: Path) -> None:
    folder = dataset.parent
    cases = {
        "no_train.csv": (["s0,audio/s0.wav,visual/s0,dog,val"], "column 'split'"),
        "header_only.csv": ([], "no data rows"),
        "empty_columns.csv": (["s0,,,dog,train"], "empty on every row"),
    }
    for name, (rows, fragment) in cases.items():
        with pytest.raises(BnfixError, match=fragment):
            read_manifest(_write(folder / name, rows))
    (folder / "blank.csv").write_text("")
    with pytest.raises(BnfixError, match="is empty"):
        read_manifest(folder / "blank.csv")
    with pytest.raises(BnfixError, match="no such manifest"):
        read_manifest(folder / "missing.csv")


# --- features ----------------------------------------------------------------------------------


def test_features_shapes_values_and_train_only_statistics(dataset: Path, tmp_path: Path) -> None:
    m = read_manifest(dataset)
    fs = _load(m, tmp_path / "cache")
    assert fs.ids == ["s0", "s1", "s2", "s3", "s4", "s5"] and fs.skipped == []
    assert fs.labels.dtype == torch.int64 and fs.labels.tolist() == [2, 1, 0, 2, 1, 0]
    assert fs.indices("train").tolist() == [0, 1, 2, 3] and fs.indices("val").tolist() == [4]
    assert fs.classes == m.classes and fs.computed == 12 and fs.cached == 0
    assert fs.audio is not None and fs.visual is not None
    assert fs.audio.shape == (6, 1, 128, 32) and fs.audio.dtype == torch.float32
    assert fs.visual.shape == (6, 3, 3, 32, 32) and fs.visual.dtype == torch.uint8

    raw = [features_with_length(*read_audio(s.audio, AUDIO), AUDIO) for s in m.samples]
    real = torch.cat([f[:n] for f, n in raw[:4]]).double()  # train only, unpadded
    mean, std = float(real.mean()), float(real.std(unbiased=False))
    for i, (f, n) in enumerate(raw):
        assert n == 98
        torch.testing.assert_close(fs.audio[i, 0, :n], ((f[:n] - mean) / (2 * std)).float())
        assert torch.allclose(fs.audio[i, 0, n:], torch.tensor(-mean / (2 * std)))
    # Normalised train frames: mean 0, std 1/2.
    train = torch.cat([fs.audio[i, 0, :98] for i in range(4)]).double()
    assert abs(float(train.mean())) < 1e-5 and abs(float(train.std(unbiased=False)) - 0.5) < 1e-5

    given = _load(m, tmp_path / "cache", replace(AUDIO, mean=-3.0, std=2.0))
    assert given.computed == 0  # mean/std apply at load time: the cache still holds
    torch.testing.assert_close(given.audio[0, 0, :98], (raw[0][0][:98] + 3.0) / 4.0)


def test_frames_are_picked_evenly_in_natural_order(tmp_path: Path) -> None:
    assert frame_indices(10, 3) == [1, 5, 8]
    assert frame_indices(2, 3) == [0, 1, 1]  # fewer frames than asked: repeat
    folder = tmp_path / "clip"
    folder.mkdir()
    for k in range(1, 11):  # flat colours 10, 20, ..., 100; frame_10 sorts last, not second
        Image.fromarray(np.full((20, 30, 3), 10 * k, np.uint8)).save(folder / f"frame_{k}.png")
    (folder / ".frame_0.png").write_bytes(b"hidden files are ignored")
    Image.fromarray(np.full((20, 30, 3), 255, np.uint8)).save(tmp_path / "still.png")
    m = read_manifest(_write(tmp_path / "m.csv", ["a,,clip,x,train", "b,,still.png,x,train"]))
    fs = _load(m, tmp_path / "cache")
    assert fs.audio is None and fs.visual is not None
    picked = fs.visual[0, :, 0, 16, 16].tolist()
    assert picked == [20, 60, 90]  # frames 2, 6 and 9 of 10 (1-based)
    assert torch.equal(fs.visual[1], torch.full((3, 3, 32, 32), 255, dtype=torch.uint8))


def test_cache_hits_and_recomputes_only_what_changed(dataset: Path, tmp_path: Path) -> None:
    m = read_manifest(dataset)
    cache = tmp_path / "cache"
    first = _load(m, cache, workers=2)  # two extraction processes: the same rows as one
    stores = sorted(p.parent for p in cache.rglob("index.jsonl"))
    assert [s.name.split("-")[0] for s in stores] == ["audio", "visual"]
    sizes = {s: (s / "data.bin").stat().st_size for s in stores}
    assert not list(cache.rglob("*.tmp"))
    assert [len((s / "index.jsonl").read_text().splitlines()) for s in stores] == [6, 6]

    warm = _load(m, cache)
    assert (warm.computed, warm.cached) == (0, 12)
    assert torch.equal(warm.audio[:], first.audio[:])
    assert torch.equal(warm.visual[:], first.visual[:])
    serial = _load(m, tmp_path / "serial", workers=1)
    assert torch.equal(serial.audio[:], first.audio[:])
    assert torch.equal(serial.visual[:], first.visual[:])

    # Touch one clip (content unchanged, new mtime): only that entry is recomputed.
    wav = m.samples[2].audio
    st = wav.stat()
    os.utime(wav, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert (_load(m, cache).computed, _load(m, cache).computed) == (1, 0)
    # Rewritten in its own row: the store does not grow.
    assert {s: (s / "data.bin").stat().st_size for s in stores} == sizes

    # Rewrite one clip with other content: recomputed, and the features follow the file.
    _wav(m.samples[3].audio, seed=99)
    changed = _load(m, cache)
    assert changed.computed == 1
    assert not torch.equal(changed.audio[3], first.audio[3])

    # Rewrite one picked frame: only that sample's visual entry.
    frame = sorted(m.samples[0].frames.iterdir())[frame_indices(4, 3)[0]]
    Image.fromarray(np.zeros((36, 44, 3), np.uint8)).save(frame)
    assert _load(m, cache).computed == 1

    # A feature parameter: every audio entry, no visual one; both sets then stay cached.
    other = replace(AUDIO, num_mel_bins=24)
    assert _load(m, cache, other).computed == 6
    assert _load(m, cache, other).computed == 0 and _load(m, cache).computed == 0
    assert _load(m, cache, visual=VisualOptions(frames=2, size=28)).computed == 6

    # A kill mid-line (a torn last index line) costs that one entry, not an error.
    index = stores[0] / "index.jsonl"
    text = index.read_text()
    index.write_text(text[: len(text) - 10])
    assert _load(m, cache).computed == 1
    assert _load(m, cache).computed == 0  # the re-extracted entry's line stands on its own


def test_unreadable_samples_are_reported_by_id_and_skipped(dataset: Path) -> None:
    folder = dataset.parent
    (folder / "audio" / "broken.wav").write_bytes(b"RIFF....WAVEfmt definitely not audio")
    _frames(folder / "visual" / "bad_jpeg", seed=7)
    (folder / "visual" / "bad_jpeg" / "frame_1.jpg").write_bytes(b"\xff\xd8\xff truncated")
    (folder / "visual" / "empty").mkdir()
    rows = [
        *dataset.read_text().splitlines()[1:],
        "broken,audio/broken.wav,visual/s0,dog,train",
        "bad_jpeg,audio/s0.wav,visual/bad_jpeg,dog,train",
        "empty,audio/s0.wav,visual/empty,cat,test",
    ]
    m = read_manifest(_write(folder / "with_bad.csv", rows))
    for round_ in range(2):  # computed, then from the cache: reported both times
        console, out = _console()
        fs = load_features(m, AUDIO, VISUAL, folder / "cache", console)
        assert fs.ids == ["s0", "s1", "s2", "s3", "s4", "s5"]
        reasons = dict(fs.skipped)
        assert list(reasons) == ["broken", "bad_jpeg", "empty"]
        assert reasons["broken"].startswith("audio: cannot decode audio")
        assert reasons["bad_jpeg"].startswith("visual: cannot decode image frame_1.jpg")
        assert reasons["empty"].startswith("visual: no image frames")
        text = out.getvalue()
        assert "skipped 3 of 9 samples" in text
        for sample_id in reasons:
            assert f"  {sample_id}: " in text
        assert fs.computed == (18 if round_ == 0 else 1)  # the empty folder is re-listed
    audio_only = load_features(m, AUDIO, VISUAL, folder / "cache", _console()[0], ("audio",))
    assert audio_only.visual is None and [i for i, _ in audio_only.skipped] == ["broken"]


def test_nothing_readable_in_train_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "a.wav").write_bytes(b"not audio at all")
    _wav(tmp_path / "b.wav", 0)
    m = read_manifest(_write(tmp_path / "m.csv", ["a,a.wav,,x,train", "b,b.wav,,x,test"]))
    with pytest.raises(BnfixError, match=r"no readable training sample.*a: audio: cannot decode"):
        _load(m, tmp_path / "cache")


def test_one_modality_manifests(dataset: Path, tmp_path: Path) -> None:
    folder = dataset.parent
    audio_rows = [f"s{i},audio/s{i}.wav,{'train' if i < 3 else 'test'},{i % 2}" for i in range(4)]
    audio_only = read_manifest(_write(folder / "a.csv", audio_rows, "id,audio,split,label"))
    assert audio_only.modalities == ("audio",)
    fs = _load(audio_only, tmp_path / "cache")
    assert fs.visual is None and fs.audio is not None and fs.audio.shape == (4, 1, 128, 32)
    with pytest.raises(BnfixError, match="no visual data"):
        _load(audio_only, tmp_path / "cache", modalities=("visual",))

    visual_rows = [f"s{i},,visual/s{i},{i % 2},train" for i in range(3)]
    visual_only = read_manifest(_write(folder / "v.csv", visual_rows))
    assert visual_only.modalities == ("visual",) and visual_only.samples[0].audio is None
    fs = _load(visual_only, tmp_path / "cache")
    assert fs.audio is None and fs.visual is not None and fs.visual.shape == (3, 3, 3, 32, 32)
