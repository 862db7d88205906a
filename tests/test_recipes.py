"""Dataset recipes (`bnfix manifest`): each public layout, generated small, becomes a manifest.

Recipes read names only, so most layouts here are empty placeholder files; the end-to-end test
writes real wav and png files and reads the manifest back with the fusion reader.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from helpers import one_error_line, run_cli, run_inprocess

from bnfix.errors import BnfixError
from bnfix.recipes import FORMATS, build, write_manifest
from bnfix.recipes.cremad import split_actors

EMOTIONS = ("ANG", "DIS", "FEA", "HAP", "NEU", "SAD")


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    return path


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


# --- ks ------------------------------------------------------------------------------------


def ks_layout(root: Path, clips: dict[str, list[tuple[str, str]]]) -> None:
    for split, items in clips.items():
        for sample_id, _ in items:
            touch(root / "audio" / split / f"{sample_id}.wav")
            touch(root / "visual" / split / sample_id / "frame_00001.jpg")


def test_ks_reads_official_lists_and_csv_lists_and_reports_missing(tmp_path):
    root = tmp_path / "ks"
    clips = {
        "train": [("a1", "dog"), ("a2", "cat"), ("a3", "dog")],
        "test": [("t1", "cat"), ("t2", "dog")],
    }
    ks_layout(root, clips)
    lists = tmp_path / "lists"
    lists.mkdir()
    # The official code's lines: a path whose last component is the id, the label last.
    (lists / "train.txt").write_text(
        "".join(f"data/visual/train/{i}/ {lab}\n" for i, lab in clips["train"]) + "x/gone cat\n"
    )
    (lists / "test.csv").write_text(
        "id,label\n" + "".join(f"{i},{lab}\n" for i, lab in clips["test"])
    )
    (root / "visual" / "test" / "t2" / "frame_00001.jpg").unlink()  # a folder with no frames

    recipe = build("ks", root, labels=lists)

    assert [(r.id, r.label, r.split) for r in recipe.rows] == [
        ("a1", "dog", "train"),
        ("a2", "cat", "train"),
        ("a3", "dog", "train"),
        ("t1", "cat", "test"),
    ]
    assert recipe.rows[0].audio == root / "audio/train/a1.wav"
    assert recipe.rows[0].frames == root / "visual/train/a1" and recipe.rows[0].video is None
    assert recipe.missing == [("gone", "train: no audio and no frames"), ("t2", "test: no frames")]
    assert recipe.counts() == {
        "cat": {"train": 1, "val": 0, "test": 1},
        "dog": {"train": 2, "val": 0, "test": 0},
    }

    combined = tmp_path / "all.csv"
    combined.write_text("a1,dog,train\nt1,cat,TEST\n")
    assert [(r.id, r.split) for r in build("ks", root, labels=combined).rows] == [
        ("a1", "train"),
        ("t1", "test"),
    ]


def test_ks_video_folder_stands_in_for_audio_and_frames(tmp_path):
    root = tmp_path / "ks"
    touch(root / "video" / "train" / "v1.mp4")
    touch(root / "audio" / "train" / "v2.wav")  # audio only, no frames, no video: missing
    labels = tmp_path / "l.csv"
    labels.write_text("v1,dog,train\nv2,cat,train\n")
    recipe = build("ks", root, labels=labels)
    assert [(r.id, r.video) for r in recipe.rows] == [("v1", root / "video/train/v1.mp4")]
    assert recipe.missing == [("v2", "train: no frames (and no video)")]


def test_ks_bad_lists_are_one_line_errors(tmp_path):
    root = tmp_path / "ks"
    ks_layout(root, {"train": [("a1", "dog")]})
    bad = tmp_path / "bad.csv"
    bad.write_text("a1,dog,dev\n")
    with pytest.raises(BnfixError, match="line 1: unknown split 'dev'"):
        build("ks", root, labels=bad)
    twice = tmp_path / "twice.csv"
    twice.write_text("a1,dog,train\na1,dog,test\n")
    with pytest.raises(BnfixError, match="'a1' is listed in train and test"):
        build("ks", root, labels=twice)
    with pytest.raises(BnfixError, match="needs --labels"):
        build("ks", root)


def test_ks_class_names_with_spaces_and_split_columns_keep_their_labels(tmp_path):
    """Kinetics-Sounds' own class names hold spaces: '<id> playing bass guitar' kept only the
    last word, so three guitar classes became one 'guitar' (exit 0); a per-split CSV with a
    split column gave every row the split's name as its label."""
    root = tmp_path / "ks"
    names = ["playing bass guitar", "playing guitar", "tapping guitar", "shoveling snow"]
    clips = {"train": [(f"c{k}", lab) for k, lab in enumerate(names)]}
    ks_layout(root, clips)
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "train.txt").write_text("".join(f"{i} {lab}\n" for i, lab in clips["train"]))
    assert [r.label for r in build("ks", root, labels=lists).rows] == names
    (lists / "train.txt").unlink()
    (lists / "train.csv").write_text(
        "id,label,split\n" + "".join(f"{i},{lab},train\n" for i, lab in clips["train"])
    )
    assert [r.label for r in build("ks", root, labels=lists).rows] == names
    # the official '<path> <frames> <label>' form: numbers between, the label last
    (lists / "train.csv").unlink()
    (lists / "train.txt").write_text(
        "".join(f"x/{i}/ 10 {k}\n" for k, (i, _) in enumerate(clips["train"]))
    )
    assert [r.label for r in build("ks", root, labels=lists).rows] == ["0", "1", "2", "3"]
    for text, message in [
        ("c0 10 playing guitar\n", "line 1: cannot tell the label"),
        ("c0,dog,test\n", r"line 1: expected '<id>,<label>' in train.txt"),
        ("c0,a,b,c\n", "quote a label holding commas"),
    ]:
        (lists / "train.txt").write_text(text)
        with pytest.raises(BnfixError, match=message):
            build("ks", root, labels=lists)


# --- cremad --------------------------------------------------------------------------------


def cremad_layout(root: Path, actors: int, sentences: tuple[str, ...] = ("DFA",)) -> list[str]:
    names = [f"{1001 + a}_{s}_{e}_XX" for a in range(actors) for s in sentences for e in EMOTIONS]
    for name in names:
        touch(root / "AudioWAV" / f"{name}.wav")
        touch(root / "VideoFlash" / f"{name}.flv")
    return names


def actor_splits(recipe) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for r in recipe.rows:
        found.setdefault(r.split, set()).add(r.id.split("_")[0])
    return found


def test_cremad_splits_whole_actors_deterministically_by_seed(tmp_path):
    root = tmp_path / "crema"
    names = cremad_layout(root, 91)
    touch(root / "AudioWAV" / "readme_notes.wav")  # not a clip name: ignored, noted

    recipe = build("cremad", root)

    assert len(recipe.rows) == 91 * 6 and not recipe.missing
    assert sorted(r.id for r in recipe.rows) == sorted(names)
    by_split = actor_splits(recipe)
    # 91 actors at 0.7/0.1/0.2, largest remainder: 64/9/18, and no actor in two splits.
    assert {s: len(a) for s, a in by_split.items()} == {"train": 64, "val": 9, "test": 18}
    assert sum(len(a) for a in by_split.values()) == len(set().union(*by_split.values())) == 91
    assert recipe.split_counts() == {"train": 64 * 6, "val": 9 * 6, "test": 18 * 6}
    assert set(recipe.counts()) == set(EMOTIONS)
    assert all(per["val"] == 9 for per in recipe.counts().values())
    row = recipe.rows[0]
    assert row.audio == root / "AudioWAV" / f"{row.id}.wav"
    assert row.frames == root / "VideoFlash" / f"{row.id}.flv" and row.video is None
    assert row.label == row.id.split("_")[2]
    assert any("ignored 1 files" in n for n in recipe.notes)

    again = build("cremad", root, seed=0)
    assert [(r.id, r.split) for r in again.rows] == [(r.id, r.split) for r in recipe.rows]
    other = actor_splits(build("cremad", root, seed=1))
    assert other["test"] != by_split["test"] and len(other["test"]) == 18

    custom = actor_splits(build("cremad", root, ratios=(0.5, 0.0, 0.5)))
    assert set(custom) == {"train", "test"} and abs(len(custom["train"]) - 45.5) <= 1


def test_cremad_split_counts_round_to_the_number_of_actors():
    actors = [str(1001 + i) for i in range(7)]
    split = split_actors(actors, 3, (0.7, 0.1, 0.2))
    counts = {s: sum(v == s for v in split.values()) for s in ("train", "val", "test")}
    assert counts == {"train": 5, "val": 1, "test": 1} and set(split) == set(actors)
    assert split_actors(["1001"], 0, (0.1, 0.0, 0.9)) == {"1001": "train"}  # train never empty


def test_cremad_missing_video_is_reported_and_strict_refuses(tmp_path):
    root = tmp_path / "crema"
    cremad_layout(root, 4)
    (root / "VideoFlash" / "1002_DFA_SAD_XX.flv").unlink()
    recipe = build("cremad", root)
    assert len(recipe.rows) == 23
    assert [m[0] for m in recipe.missing] == ["1002_DFA_SAD_XX"]
    assert recipe.missing[0][1].endswith("no VideoFlash video")
    with pytest.raises(BnfixError, match=r"1 listed clip lacks its files .*1002_DFA_SAD_XX"):
        build("cremad", root, strict=True)
    with pytest.raises(BnfixError, match="three numbers"):
        build("cremad", root, ratios=(0.7, 0.3))


# --- ave -----------------------------------------------------------------------------------


def test_ave_reads_the_official_lists_with_commas_in_categories(tmp_path):
    root = tmp_path / "AVE_Dataset"
    header = "Category&VideoID&Quality&StartTime&EndTime\n"
    (root / "AVE").mkdir(parents=True)
    (root / "Annotations.txt").write_text(header + "Church bell&RUhOCu3LNXM&good&0&10\n")
    (root / "trainSet.txt").write_text(
        header
        + "Church bell&RUhOCu3LNXM&good&0&10\n"
        + "Male speech, man speaking&-Ab_c1&good&2&7\n"
        + "Male speech, man speaking&-Ab_c1&good&2&7\n"  # a repeated line: kept once
        + "Dog&twoEvents&good&0&4\n"
        + "Bark&twoEvents&good&5&9\n"
    )
    (root / "valSet.txt").write_text("Dog&gone123&good&1&3\n")  # no header, no video
    (root / "testSet.txt").write_text("Church bell&tst99&good&0&10\n")
    for vid in ("RUhOCu3LNXM", "-Ab_c1", "twoEvents", "tst99"):
        touch(root / "AVE" / f"{vid}.mp4")

    recipe = build("ave", root)

    assert [(r.id, r.label, r.split) for r in recipe.rows] == [
        ("RUhOCu3LNXM", "Church bell", "train"),
        ("-Ab_c1", "Male speech, man speaking", "train"),
        ("twoEvents_0_4", "Dog", "train"),
        ("twoEvents_5_9", "Bark", "train"),
        ("tst99", "Church bell", "test"),
    ]
    assert recipe.rows[0].video == root / "AVE/RUhOCu3LNXM.mp4" and recipe.rows[0].audio is None
    assert recipe.missing == [("gone123", "val: no AVE/gone123.mp4")]
    assert any("1 repeated" in n for n in recipe.notes)

    out = write_manifest(recipe, tmp_path / "m.csv")
    rows = read_rows(out)
    assert rows[1]["label"] == "Male speech, man speaking"  # quoted, one field
    assert rows[1]["video"] == "AVE_Dataset/AVE/-Ab_c1.mp4" and rows[1]["frames"] == ""


# --- vggsound ------------------------------------------------------------------------------


def test_vggsound_ids_quoted_labels_and_video_folders(tmp_path):
    root = tmp_path / "vgg"
    root.mkdir()
    (root / "vggsound.csv").write_text(
        '---g-f_I2yQ,1,"male speech, man speaking",test\n'
        "--0PQM4-hqg,30,waterfall burbling,train\n"
        "--0PQM4-hqg,30,waterfall burbling,train\n"  # listed twice: first row kept
        "abc,250,dog barking,train\n"
        "gone,0,dog barking,train\n"
    )
    touch(root / "---g-f_I2yQ_000001.mp4")
    touch(root / "video" / "--0PQM4-hqg_000030.mp4")
    touch(root / "video" / "abc_000250_000260.mp4")  # the start_end naming

    recipe = build("vggsound", root)

    assert [(r.id, r.label, r.split) for r in recipe.rows] == [
        ("---g-f_I2yQ_000001", "male speech, man speaking", "test"),
        ("--0PQM4-hqg_000030", "waterfall burbling", "train"),
        ("abc_000250", "dog barking", "train"),
    ]
    assert recipe.rows[2].video == root / "video/abc_000250_000260.mp4"
    assert recipe.missing == [("gone_000000", "train: no gone_000000.mp4")]
    elsewhere = tmp_path / "clips"
    touch(elsewhere / "gone_000000.mp4")
    assert [r.id for r in build("vggsound", root, videos=elsewhere).rows] == ["gone_000000"]

    (root / "vggsound.csv").write_text("abc,250,dog barking,dev\n")
    with pytest.raises(BnfixError, match="line 1: unknown split 'dev'"):
        build("vggsound", root)


# --- folders -------------------------------------------------------------------------------


def test_folders_pairs_entries_by_stem_and_picks_unique_ids(tmp_path):
    root = tmp_path / "data"
    touch(root / "train/dog/x.wav")
    touch(root / "train/dog/x/0001.jpg")  # frames of x: one sample with x.wav
    touch(root / "train/dog/y.mp4")  # one video: both modalities
    touch(root / "train/cat/z.flac")
    touch(root / "train/cat/z.png")
    touch(root / "train/cat/lonely.wav")  # audio only, while others give frames: missing
    touch(root / "train/cat/notes.txt")  # not media: skipped
    touch(root / "test/cat/w.ogg")
    touch(root / "test/cat/w/frame1.png")
    (root / "test/cat/empty").mkdir()  # a frame folder without frames: missing
    touch(root / "cache/junk.bin")  # not a split: ignored

    recipe = build("folders", root)

    assert [(r.id, r.label, r.split) for r in recipe.rows] == [
        ("z", "cat", "train"),
        ("x", "dog", "train"),
        ("y", "dog", "train"),
        ("w", "cat", "test"),
    ]
    x = recipe.rows[1]
    assert x.audio == root / "train/dog/x.wav" and x.frames == root / "train/dog/x"
    assert recipe.rows[2].video == root / "train/dog/y.mp4"
    assert sorted(recipe.missing) == [
        ("empty", "test: folder empty/ holds no images"),
        ("lonely", "train: no frames"),
    ]
    assert any("skipped 1" in n for n in recipe.notes)

    touch(root / "test/bird/x.mp4")  # a second stem x: every id becomes <class>/<stem>
    ids = [r.id for r in build("folders", root).rows]
    assert ids == ["cat/z", "dog/x", "dog/y", "bird/x", "cat/w"]
    touch(root / "train/dog/x.mp4")  # train/dog/x now has audio, frames and video
    touch(root / "val/dog/x.mp4")  # dog/x in two splits: <split>/<class>/<stem>
    ids = [r.id for r in build("folders", root).rows]
    assert ids == [
        "train/cat/z",
        "train/dog/x",
        "train/dog/y",
        "val/dog/x",
        "test/bird/x",
        "test/cat/w",
    ]

    touch(root / "train/dog/x.flac")
    with pytest.raises(BnfixError, match=r"x\.flac and x\.wav are both audio"):
        build("folders", root)


def test_every_format_refuses_a_root_without_its_layout(tmp_path):
    (tmp_path / "stuff").mkdir()
    expected = {
        "ks": "no audio/ folder",
        "cremad": "no AudioWAV/ folder",
        "ave": "no trainSet.txt",
        "vggsound": "no vggsound.csv",
        "folders": "no train/ folder",
    }
    assert set(expected) == set(FORMATS)
    for fmt, message in expected.items():
        options = {"labels": tmp_path} if fmt == "ks" else {}
        with pytest.raises(BnfixError, match=message):
            build(fmt, tmp_path / "stuff", **options)


# --- writing and the CLI -------------------------------------------------------------------


def test_cli_writes_relative_or_absolute_paths_and_never_overwrites_without_force(tmp_path):
    root = tmp_path / "crema"
    cremad_layout(root, 3)
    out = tmp_path / "out" / "m.csv"
    done = run_inprocess("manifest", "cremad", root, "--out", out, "--ratios", "2,0,1")
    assert done.code == 0, done.stderr
    assert "split by actor (seed 0): train 2 actors, val 0 actors, test 1 actor" in done.stdout
    assert "18 clips (train 12, test 6) in 6 classes" in done.stdout
    assert f"wrote {out}" in done.stdout
    rows = read_rows(out)
    assert list(rows[0]) == ["id", "label", "split", "audio", "frames", "video"]
    assert rows[0]["audio"] == f"../crema/AudioWAV/{rows[0]['id']}.wav"
    assert (
        out.parent / rows[0]["frames"]
    ).resolve() == root / "VideoFlash" / f"{rows[0]['id']}.flv"
    before = out.read_bytes()

    again = run_inprocess("manifest", "cremad", root, "--out", out, "--absolute")
    assert again.code == 2 and "exists; pass --force" in one_error_line(again.stderr)
    assert out.read_bytes() == before

    forced = run_inprocess("manifest", "cremad", root, "--out", out, "--absolute", "--force")
    assert forced.code == 0, forced.stderr
    assert read_rows(out)[0]["audio"] == str((root / "AudioWAV").resolve() / f"{rows[0]['id']}.wav")
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.csv"]  # no temporary left


def test_cli_strict_bad_root_and_bad_options_exit_2_and_write_nothing(tmp_path):
    root = tmp_path / "crema"
    cremad_layout(root, 3)
    (root / "AudioWAV" / "1001_DFA_ANG_XX.wav").unlink()
    out = tmp_path / "m.csv"
    cases = [
        (["cremad", root, "--strict"], "1 listed clip lacks its files (first: 1001_DFA_ANG_XX"),
        (["cremad", tmp_path / "nowhere"], "no such dataset folder"),
        (["cremad", tmp_path], "no AudioWAV/ folder"),
        (["ave", root], "no trainSet.txt"),
        (["cremad", root, "--labels", tmp_path], "--labels does not apply to the cremad format"),
        (["cremad", root, "--ratios", "a,b,c"], "--ratios 'a,b,c'"),
        (["cremad", root, "--ratios", "0,1,1"], "train > 0"),
        (["mnist", root], "Invalid value for 'FORMAT'"),
    ]
    for args, message in cases:
        done = run_inprocess("manifest", *args, "--out", out)
        assert done.code == 2, (args, done.stdout, done.stderr)
        assert message in one_error_line(done.stderr), args
        assert not out.exists() and list(tmp_path.glob(".m.csv*")) == []

    folder = run_inprocess("manifest", "cremad", root, "--out", tmp_path, "--force")
    assert folder.code == 2 and "is a folder" in one_error_line(folder.stderr)

    lenient = run_inprocess("manifest", "cremad", root, "--out", out)
    assert lenient.code == 0, lenient.stderr
    assert "missing: 1 listed clip lacks its files" in lenient.stdout
    assert len(read_rows(out)) == 17


def test_cli_ratios_each_finite_but_summing_past_float_range_are_one_line(tmp_path):
    """1e308,1e308,0: every share finite and >= 0, the sum inf (shares NaN): refused up front."""
    root = tmp_path / "crema"
    cremad_layout(root, 3)
    out = tmp_path / "m.csv"
    cases = [
        ("1e308,1e308,0", "--ratios 1e+308,1e+308,0: the shares' sum overflows"),
        ("1e308,0,1e308", "the shares' sum overflows"),
        ("nan,1,1", "shares must be finite"),
        ("1e400,0,0", "shares must be finite"),
    ]
    for ratios, message in cases:
        done = run_inprocess("manifest", "cremad", root, "--out", out, "--ratios", ratios)
        assert done.code == 2, (ratios, done.stderr)
        assert message in one_error_line(done.stderr), ratios
        assert "Traceback" not in done.stderr and list(tmp_path.iterdir()) == [root]
    assert (
        run_inprocess("manifest", "cremad", root, "--out", out, "--ratios", "1e307,0,1e307").code
        == 0
    )


def test_a_failed_write_leaves_no_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    root = tmp_path / "crema"
    cremad_layout(root, 2)
    recipe = build("cremad", root)
    out = tmp_path / "m.csv"
    out.write_text("old\n")

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("bnfix.recipes.common.os.fsync", disk_full)
    with pytest.raises(BnfixError, match="cannot write: No space left on device"):
        write_manifest(recipe, out, force=True)
    assert out.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crema", "m.csv"]


def test_cli_an_out_that_cannot_be_written_is_one_line_and_writes_nothing(tmp_path):
    """A folder that cannot be made (a file in its place; under /proc, where mkdir fails even
    as root) or a file that cannot be created is one line naming the path and why, exit 2."""
    root = tmp_path / "crema"
    cremad_layout(root, 2)
    (tmp_path / "file.txt").write_text("kept\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    cases = [
        (tmp_path / "file.txt" / "m.csv", "file.txt: not a folder"),
        (tmp_path / "file.txt" / "sub" / "m.csv", "file.txt/sub: "),
    ]
    if Path("/proc/self").is_dir():
        cases += [
            (Path("/proc/self/bnfix-x/m.csv"), "cannot create folder /proc/self/bnfix-x: "),
            (Path("/proc/self/bnfix-m.csv"), "cannot write: "),
        ]
    for out, message in cases:
        done = run_inprocess("manifest", "cremad", root, "--out", out, "--force")
        assert done.code == 2, (out, done.stderr)
        line = one_error_line(done.stderr)
        assert str(out) in line and message in line, line
        assert "Traceback" not in done.stderr and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (tmp_path / "file.txt").read_text() == "kept\n"
    assert not Path("/proc/self/bnfix-x").exists()


def test_a_failed_cleanup_does_not_hide_why_the_write_failed(tmp_path, monkeypatch):
    root = tmp_path / "crema"
    cremad_layout(root, 2)
    recipe = build("cremad", root)

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    def cannot_unlink(self: Path, missing_ok: bool = False) -> None:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr("bnfix.recipes.common.os.fsync", disk_full)
    monkeypatch.setattr(Path, "unlink", cannot_unlink)
    with pytest.raises(BnfixError, match="cannot write: No space left on device"):
        write_manifest(recipe, tmp_path / "m.csv")
    assert not (tmp_path / "m.csv").exists()


def test_cli_never_replaces_a_file_the_dataset_reads_even_with_force(tmp_path):
    """``--out`` naming the dataset's own list (vggsound.csv, a ks --labels file or a list in
    a --labels folder) or one of its clips, however spelled, is refused before anything is
    written: --force replaces an old manifest, never an input."""
    vgg = tmp_path / "vgg"
    vgg.mkdir()
    (vgg / "vggsound.csv").write_text("abc,0,dog barking,train\nxyz,10,cat,test\n")
    touch(vgg / "abc_000000.mp4").write_bytes(b"video")
    touch(vgg / "video" / "xyz_000010.mp4")
    ks = tmp_path / "ks"
    ks_layout(ks, {"train": [("a1", "dog")], "test": [("t1", "cat")]})
    combined = tmp_path / "ks.csv"
    combined.write_text("a1,dog,train\nt1,cat,test\n")
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "train.txt").write_text("a1 dog\n")
    (lists / "test.csv").write_text("t1,cat\n")
    (tmp_path / "link.csv").symlink_to(vgg / "vggsound.csv")
    cases = [
        (["vggsound", vgg], vgg / "vggsound.csv", "vggsound.csv"),
        (["vggsound", vgg], tmp_path / "vgg" / ".." / "vgg" / "vggsound.csv", "vggsound.csv"),
        (["vggsound", vgg], tmp_path / "link.csv", "vggsound.csv"),
        (["vggsound", vgg], vgg / "abc_000000.mp4", "abc_000000.mp4"),
        (["ks", ks, "--labels", combined], combined, "ks.csv"),
        (["ks", ks, "--labels", lists], lists / "train.txt", "train.txt"),
        (["ks", ks, "--labels", lists], lists / "test.csv", "test.csv"),
    ]
    everything = [p for p in tmp_path.rglob("*") if p.is_file()]
    before = {p: p.read_bytes() for p in everything}
    for args, out, name in cases:
        done = run_inprocess("manifest", *args, "--out", out, "--force")
        assert done.code == 2, (out, done.stdout, done.stderr)
        line = one_error_line(done.stderr)
        assert f"is the dataset's own {name}" in line and "--force never replaces" in line, line
        assert {p: p.read_bytes() for p in everything} == before
        assert sorted(p for p in tmp_path.rglob("*") if p.is_file()) == sorted(everything)
    with pytest.raises(BnfixError, match=r"dataset's own vggsound\.csv"):
        write_manifest(build("vggsound", vgg), vgg / "vggsound.csv", force=True)
    # an old manifest beside the list is still replaced with --force
    assert run_inprocess("manifest", "vggsound", vgg, "--out", vgg / "m.csv").code == 0
    assert run_inprocess("manifest", "vggsound", vgg, "--out", vgg / "m.csv", "--force").code == 0


def test_folders_split_names_public_datasets_use(tmp_path):
    """``training/``, ``validation/`` (and the other names a split goes by) are that split; a
    folder naming no split is ignored with a note, not silently; two names for one split are
    an error."""
    root = tmp_path / "kinetics"
    touch(root / "training/dog/a.mp4")
    touch(root / "validation/dog/b.mp4")
    touch(root / "testing/cat/c.mp4")
    touch(root / "training/cat/d.mp4")
    touch(root / "extras/readme.mp4")
    recipe = build("folders", root)
    assert [(r.id, r.split) for r in recipe.rows] == [
        ("d", "train"), ("a", "train"), ("b", "val"), ("c", "test"),
    ]  # fmt: skip
    assert recipe.rows[2].video == root / "validation/dog/b.mp4"
    assert "ignored folders that name no split: extras/" in recipe.notes
    touch(root / "val/dog/e.mp4")
    with pytest.raises(BnfixError, match=r"both val/ and validation/ hold the val split"):
        build("folders", root)
    with pytest.raises(BnfixError, match="no train/ folder"):
        build("folders", root / "extras")  # no split folder at all


def test_folders_manifest_of_real_files_reads_back_in_the_fusion_reader(tmp_path):
    import soundfile
    from PIL import Image

    from bnfix.fusion.manifest import read_manifest

    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("test", 2)):
        for label in ("bird", "car"):
            for i in range(n):
                stem = f"{label}{split}{i}"
                wav = root / split / label / f"{stem}.wav"
                wav.parent.mkdir(parents=True, exist_ok=True)
                soundfile.write(wav, rng.uniform(-0.5, 0.5, 1600).astype(np.float32), 16000)
                frames = root / split / label / stem
                frames.mkdir()
                for f in range(2):
                    pixels = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
                    Image.fromarray(pixels).save(frames / f"{f:03d}.png")
    out = root / "manifest.csv"

    done = run_cli("manifest", "folders", root)

    assert done.code == 0, done.stderr
    assert (
        f"wrote {out}" in done.stdout and "10 clips (train 6, test 4) in 2 classes" in done.stdout
    )
    manifest = read_manifest(out)
    assert manifest.classes == ["bird", "car"] and manifest.modalities == ("audio", "visual")
    assert [s.id for s in manifest.split("test")] == [
        "birdtest0",
        "birdtest1",
        "cartest0",
        "cartest1",
    ]
    first = manifest.samples[0]
    assert first.audio == (root / "train/bird/birdtrain0.wav").resolve()
    assert first.frames == (root / "train/bird/birdtrain0").resolve()
    assert soundfile.info(first.audio).frames == 1600


def test_report_summarises_many_classes_in_one_line():
    from rich.console import Console

    from bnfix.recipes import Recipe, Row, report

    rows = [Row(f"c{i}", f"class{i:02d}", "train") for i in range(41)]
    rows += [Row("extra", "class07", "test"), Row("extra2", "class07", "train")]
    console = Console(record=True, width=200)
    report(Recipe("folders", Path("."), rows=rows, missing=[("m", "train: no audio")]), console)
    text = console.export_text()
    assert "missing: 1 listed clip lacks its files (first: m (train: no audio))" in text
    assert "41 classes; clips per class: min 1 (class00), median 1, max 3 (class07)" in text
    assert "43 clips (train 42, test 1) in 41 classes" in text


def test_vggsound_manifest_of_real_videos_reads_back_with_both_modalities(tmp_path):
    """``bnfix manifest vggsound`` on real .mp4 files (H.264 + AAC): the video column gives
    the fusion reader both modalities, and every clip's features extract."""
    from rich.console import Console

    from bnfix.fusion.features import VisualOptions, load_features
    from bnfix.fusion.manifest import read_manifest
    from bnfix.media.synth import write_video
    from bnfix.probe_audio import AudioOptions

    root = tmp_path / "vgg"
    root.mkdir()
    lines = []
    rng = np.random.default_rng(0)
    for i, (label, split) in enumerate([("dog", "train"), ("cat", "train"), ("dog", "test")]):
        wave = (0.1 * rng.standard_normal((1, 16000))).astype(np.float32)
        write_video(root / f"yt{i}_{10 * i:06d}.mp4", 1.0, audio=wave, audio_rate=16000)
        lines.append(f"yt{i},{10 * i},{label},{split}")
    (root / "vggsound.csv").write_text("\n".join(lines) + "\n")
    r = run_inprocess("manifest", "vggsound", root)
    assert r.code == 0, r.stderr
    m = read_manifest(root / "manifest.csv")
    assert m.modalities == ("audio", "visual") and [s.id for s in m.samples] == [
        "yt0_000000", "yt1_000010", "yt2_000020",
    ]  # fmt: skip
    fs = load_features(
        m, AudioOptions(num_mel_bins=16, target_frames=32), VisualOptions(frames=2, size=28),
        tmp_path / "cache", Console(quiet=True), workers=1,
    )  # fmt: skip
    assert fs.skipped == [] and fs.audio.shape == (3, 1, 32, 16)
    assert fs.visual.shape == (3, 2, 3, 32, 32)


def test_cremad_manifest_of_real_wav_and_flv_files_extracts_both_modalities(tmp_path):
    """``bnfix manifest cremad`` on CREMA-D's real formats: 16 kHz mono WAVs and FLV1 (Sorenson
    H.263) videos with an MP3 track, the frames column naming the .flv; every clip's audio and
    frames extract, and no actor's clips fall in two splits."""
    import soundfile
    from rich.console import Console

    from bnfix.fusion.features import VisualOptions, load_features
    from bnfix.fusion.manifest import read_manifest
    from bnfix.media.synth import frame_index, write_video
    from bnfix.probe_audio import AudioOptions

    root = tmp_path / "crema"
    (root / "AudioWAV").mkdir(parents=True)
    (root / "VideoFlash").mkdir()
    rng = np.random.default_rng(0)
    names = [f"{1001 + a}_IEO_{e}_HI" for a in range(5) for e in ("ANG", "SAD")]
    for name in names:
        wave = (0.1 * rng.standard_normal(8000)).astype(np.float32)
        soundfile.write(root / "AudioWAV" / f"{name}.wav", wave, 16000)
        mp3 = (0.1 * rng.standard_normal((1, 22050))).astype(np.float32)
        write_video(
            root / "VideoFlash" / f"{name}.flv", 0.5, codec="flv", options={"qscale": "3"},
            audio=mp3, audio_rate=44100, audio_codec="libmp3lame",
        )  # fmt: skip
    r = run_inprocess("manifest", "cremad", root)
    assert r.code == 0, r.stderr
    m = read_manifest(root / "manifest.csv")
    assert m.modalities == ("audio", "visual") and m.classes == ["ANG", "SAD"]
    splits: dict[str, set[str]] = {}
    for s in m.samples:
        splits.setdefault(s.id.split("_")[0], set()).add(s.split)
        assert s.frames.suffix == ".flv"
    assert all(len(found) == 1 for found in splits.values()), splits
    whole = VisualOptions(frames=3, size=56, eval_resize="full-frame")  # squares of the frame
    fs = load_features(
        m, AudioOptions(num_mel_bins=16, target_frames=32), whole, tmp_path / "cache",
        Console(quiet=True), workers=1,
    )  # fmt: skip
    assert fs.skipped == [] and fs.audio.shape == (10, 1, 32, 16)
    assert fs.visual.shape == (10, 3, 3, 64, 64)
    # segment centres of 0.5 s at 25 fps: frames 2, 6 and 10 (the bit band survives resizing)
    first = fs.visual[0].permute(0, 2, 3, 1).numpy()
    assert [frame_index(np.asarray(_resized(f))) for f in first] == [2, 6, 10]


def _resized(frame: np.ndarray) -> np.ndarray:
    """A stored square back at the pattern's 64 x 48, for reading its bit band."""
    from PIL import Image

    return np.asarray(Image.fromarray(frame).resize((64, 48), Image.BILINEAR))
