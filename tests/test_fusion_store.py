"""The memory-mapped feature store, extraction on processes, and the visual pipeline options."""

from __future__ import annotations

import faulthandler
import io
import json
import os
import pickle
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rich.console
import soundfile as sf
import torch
from helpers import BNFIX, fusion_toml, one_error_line, run_inprocess
from PIL import Image

from bnfix.fusion import augment
from bnfix.fusion.extract import Computed, Job, extract
from bnfix.fusion.features import VisualOptions, load_features
from bnfix.fusion.manifest import read_manifest
from bnfix.fusion.stages import segment_picks
from bnfix.fusion.store import FeatureStore, Record, Rows, write_row
from bnfix.probe_audio import AudioOptions

AUDIO = AudioOptions(num_mel_bins=16, target_frames=64)


def _quiet():
    import rich.console

    return rich.console.Console(quiet=True)


# --- the store ---------------------------------------------------------------------------------


def test_store_rows_index_and_torn_lines(tmp_path: Path) -> None:
    store = FeatureStore(tmp_path / "s", (2, 3), "<f4", {"p": 1})
    rows = store.allocate(["a", "b", "c"])
    assert rows == {"a": 0, "b": 1, "c": 2} and store.capacity == 3
    for row in rows.values():
        write_row(store.data_path, row, np.full((2, 3), row + 0.5, np.float32))
    store.commit([Record(name=n, key=f"k{n}", row=r) for n, r in rows.items()])
    store.commit([Record(name="bad", key="kbad", row=-1, error="no audio track")])

    again = FeatureStore(tmp_path / "s", (2, 3), "<f4", {"p": 1})
    assert again.fresh("b", "kb").row == 1 and again.fresh("b", "other") is None
    assert again.records["bad"].error == "no audio track"
    view = Rows(again.array(), np.array([2, 0]))
    assert view.shape == (2, 2, 3) and view.dtype == torch.float32
    assert view[0].tolist() == [[2.5] * 3] * 2
    assert view[torch.tensor([1, 0]), 1, 0].tolist() == [0.5, 2.5]
    # A known name keeps its row; a new one goes to the end; stale rows are reused in place.
    assert again.allocate(["b", "d"]) == {"b": 1, "d": 3}

    # A torn last line (a kill mid-write) is ignored; the lines before it stand.
    with open(again.index_path, "a") as fh:
        fh.write('{"name": "d", "key": "kd", "ro')
    third = FeatureStore(tmp_path / "s", (2, 3), "<f4", {"p": 1})
    assert sorted(third.records) == ["a", "b", "bad", "c"]
    # Another layout in the same folder starts over rather than misreading the bytes.
    other = FeatureStore(tmp_path / "s", (4,), "<f4", {"p": 2})
    assert other.records == {} and other.capacity == 0


def test_a_run_waiting_for_the_store_lock_says_so_then_proceeds(tmp_path: Path) -> None:
    """Two runs on one cache take turns; the waiting one was silent, which looked like a hang
    (and was one while a killed run's workers held the lock)."""
    import fcntl
    import threading

    store = FeatureStore(tmp_path / "s", (2, 3), "<f4", {"p": 1})
    waited, entered = threading.Event(), threading.Event()

    def fill() -> None:
        with store.locked(on_wait=waited.set):
            entered.set()

    with open(store.folder / "lock", "a") as other:  # another run holds it
        fcntl.flock(other, fcntl.LOCK_EX)
        thread = threading.Thread(target=fill)
        thread.start()
        assert waited.wait(10) and not entered.wait(0.3)  # told, and still waiting
    thread.join(10)
    assert entered.is_set()
    quiet = threading.Event()
    with store.locked(on_wait=quiet.set):  # nobody holds it: no message
        pass
    assert not quiet.is_set()


# --- extraction: processes, kill, resume --------------------------------------------------------


def _wav_dataset(folder: Path, n: int, seconds: float = 0.5) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = ["id,audio,label,split"]
    for i in range(n):
        sf.write(folder / f"c{i}.wav", 0.1 * rng.standard_normal(int(16000 * seconds)), 16000)
        rows.append(f"c{i},c{i}.wav,{i % 2},{'test' if i % 4 == 3 else 'train'}")
    (folder / "m.csv").write_text("\n".join(rows) + "\n")
    return folder / "m.csv"


def _freeze_at(proc: subprocess.Popen, cache: Path, rows: int) -> Path | None:
    """Freeze ``proc``'s process group (SIGSTOP) the moment a store index under ``cache``
    holds ``rows`` rows, and return that index (None if the run ended first). Small clips
    extract at ~1,000/s on two workers: a kill sent a few scheduler ticks after the index was
    read found every sample extracted on a loaded CI machine; frozen, the run waits for it."""
    found: list[Path] = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        found = found or list(cache.rglob("index.jsonl"))
        if found and len(found[0].read_bytes().splitlines()) >= rows:
            os.killpg(proc.pid, signal.SIGSTOP)
            return found[0]
        time.sleep(0.002)
    return None


_EXTRACT = """
import sys, rich.console
from pathlib import Path
from bnfix.fusion.extract import Computed, Job, extract
from bnfix.fusion.features import VisualOptions, load_features
from bnfix.fusion.manifest import read_manifest
from bnfix.probe_audio import AudioOptions
fs = load_features(read_manifest(Path(sys.argv[1])), AudioOptions(num_mel_bins=16,
    target_frames=64), VisualOptions(), Path(sys.argv[2]), rich.console.Console(quiet=True),
    workers=int(sys.argv[3]))
print(fs.computed)
"""


def test_a_file_it_may_not_read_is_retried_once_it_may(tmp_path: Path) -> None:
    """A file without read permission reached the decoder and was stored as undecodable
    ("System error.") under its size and mtime, which a chmod changes neither of: fixing the
    permission never brought it back. Run without the capability that lets root read
    anything, as a user's account runs."""
    import shutil

    prefix: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("root, and no setpriv to drop CAP_DAC_OVERRIDE")
        caps = "-dac_override,-dac_read_search"
        prefix = ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}", "--"]
    manifest = _wav_dataset(tmp_path / "d", 4)
    script = _EXTRACT.replace("print(fs.computed)", "print(fs.computed, fs.skipped)")
    run = [*prefix, sys.executable, "-c", script, str(manifest), str(tmp_path / "cache"), "1"]
    locked = tmp_path / "d" / "c1.wav"
    locked.chmod(0)
    try:
        first = subprocess.run(run, capture_output=True, text=True, timeout=300)
        if first.returncode != 0 and "setpriv" in first.stderr:
            pytest.skip(f"cannot drop capabilities here: {first.stderr.strip()[:100]}")
        assert first.returncode == 0, first.stderr
        assert first.stdout.strip() == "4 [('c1', 'audio: cannot read: permission denied')]"
    finally:
        locked.chmod(0o644)
    again = subprocess.run(run, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == "1 []"  # c1 now, and only c1


def test_extraction_killed_half_way_resumes_where_it_stopped(tmp_path: Path) -> None:
    manifest = _wav_dataset(tmp_path / "d", 48, seconds=2.0)
    cache = tmp_path / "cache"
    proc = subprocess.Popen(
        [sys.executable, "-c", _EXTRACT, str(manifest), str(cache), "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # the kill takes the extraction workers too
    )
    index = _freeze_at(proc, cache, 6)
    assert index is not None, proc.communicate()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len([ln for ln in index.read_text().split("\n")[:-1] if ln])
    assert 6 <= done < 48  # killed half-way: some done, some not

    fs = load_features(read_manifest(manifest), AUDIO, VisualOptions(), cache, _quiet(), workers=2)
    assert fs.computed == 48 - done  # nothing that was done is recomputed
    fresh = load_features(
        read_manifest(manifest), AUDIO, VisualOptions(), tmp_path / "c2", _quiet(), workers=1
    )
    assert torch.equal(fs.audio[:], fresh.audio[:])  # and the resumed store is the same
    assert (fs.audio_mean, fs.audio_std) == pytest.approx((fresh.audio_mean, fresh.audio_std))


def test_streaming_statistics_equal_a_float64_pass(tmp_path: Path) -> None:
    import io

    import rich.console

    m = read_manifest(_wav_dataset(tmp_path / "d", 8))
    log = io.StringIO()  # not a terminal (a batch job's log): plain progress lines, no bar
    console = rich.console.Console(file=log, width=200)
    old = tmp_path / "cache" / "audio"  # the per-sample cache of earlier versions
    old.mkdir(parents=True)
    (old / "0123.safetensors").write_bytes(b"x" * 2048)
    fs = load_features(m, AUDIO, VisualOptions(), tmp_path / "cache", console, workers=1)
    assert "audio features (1 process): 8/8 (100%)" in log.getvalue()
    assert "hold 1 files (0 MiB) of the per-sample cache of earlier bnfix" in log.getvalue()
    from bnfix.probe_audio import features_with_length, read_audio

    train = []
    for s in m.samples:
        if s.split == "train":
            feats, frames = features_with_length(*read_audio(s.audio, AUDIO), AUDIO)
            train.append(feats[:frames].double())
    values = torch.cat(train)
    assert fs.audio_mean == pytest.approx(float(values.mean()), rel=1e-9)
    assert fs.audio_std == pytest.approx(float(values.std(unbiased=False)), rel=1e-9)


# --- visual options -----------------------------------------------------------------------------


def test_segment_picks_draw_within_segments_per_epoch_and_middles_for_eval() -> None:
    counts = torch.tensor([10, 3, 1, 7])
    samples = torch.arange(4)
    middle = segment_picks(counts, 3, None, 0, samples)
    assert middle.tolist() == [[1, 4, 8], [0, 1, 2], [0, 0, 0], [1, 3, 5]]
    seen = [set(), set(), set()]
    for epoch in range(200):
        picks = segment_picks(counts, 3, 1234, epoch, samples)
        assert torch.equal(picks, segment_picks(counts, 3, 1234, epoch, samples))  # replayable
        for k, (lo, hi) in enumerate([(0, 3), (3, 6), (6, 10)]):
            assert lo <= int(picks[0, k]) < hi
            seen[k].add(int(picks[0, k]))
        assert picks[2].tolist() == [0, 0, 0] and picks[1].tolist() == [0, 1, 2]
    assert seen == [{0, 1, 2}, {3, 4, 5}, {6, 7, 8, 9}]  # every frame of a segment comes up
    assert not torch.equal(
        segment_picks(counts, 3, 1, 0, samples), segment_picks(counts, 3, 1, 1, samples)
    )


def test_random_resized_crop_matches_torchvisions_distribution() -> None:
    """Boxes drawn in normalised coordinates have torchvision's scale and ratio statistics
    on the source frame (here 16:9), measured over many draws of both."""
    from torchvision.transforms import RandomResizedCrop

    torch.manual_seed(0)
    height, width = 90, 160
    ours_w, ours_h, _, _ = augment._rrc_boxes(
        torch.full((4000,), width / height), torch.Generator().manual_seed(1), torch.device("cpu")
    )
    area = (ours_w * ours_h).numpy()
    ratio = (ours_w * width / (ours_h * height)).numpy()
    img = torch.zeros(3, height, width)
    ref = [RandomResizedCrop.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(4000)]
    ref_area = np.array([h * w / (height * width) for _, _, h, w in ref])
    ref_ratio = np.array([w / h for _, _, h, w in ref])
    assert abs(area.mean() - ref_area.mean()) < 0.02
    assert abs(np.log(ratio).mean() - np.log(ref_ratio).mean()) < 0.02
    assert ratio.min() >= 0.74 and ratio.max() <= 1.34 and area.min() >= 0.079


def test_whole_frame_layout_full_frame_eval_and_crops(tmp_path: Path) -> None:
    """The whole-frame store keeps the frame's content and its aspect: evaluation's full-frame
    resize equals resizing the source image straight to size x size (up to the stored square's
    extra resampling), and training crops have the asked size."""
    import torchvision.transforms.v2.functional as TF

    folder = tmp_path / "d"
    folder.mkdir()
    yy, xx = np.mgrid[0:60, 0:120]
    rows = ["id,frames,label,split"]
    for i in range(4):
        img = np.stack([xx * 2, yy * 4, np.full_like(xx, 60 * i)], -1).astype(np.uint8)
        Image.fromarray(img).save(folder / f"f{i}.png")
        rows.append(f"f{i},f{i}.png,{i % 2},train")
    (folder / "m.csv").write_text("\n".join(rows) + "\n")
    opts = VisualOptions(frames=2, size=28, crop="random-resized", eval_resize="full-frame")
    fs = load_features(
        read_manifest(folder / "m.csv"), AUDIO, opts, tmp_path / "c", _quiet(), workers=1
    )
    assert fs.visual.shape == (4, 2, 3, 32, 32)
    assert fs.visual_aspect.tolist() == [2.0] * 4
    batch = fs.visual[torch.arange(4)]
    evals = augment.visual_whole_batch(batch, fs.visual_aspect, 28, False, eval_resize="full-frame")
    source = torch.from_numpy(np.array(Image.open(folder / "f1.png"))).permute(2, 0, 1)
    direct = augment._normalise(TF.resize(source, [28, 28], antialias=True)[None])[0]
    assert (evals[1, 0] - direct).abs().mean() < 0.05  # normalised units (~3/255 per pixel)
    g = torch.Generator().manual_seed(0)
    train = augment.visual_whole_batch(batch, fs.visual_aspect, 28, True, g, "random-resized")
    assert train.shape == (4, 2, 3, 28, 28) and torch.isfinite(train).all()
    centre = augment.visual_whole_batch(
        batch, fs.visual_aspect, 28, False, eval_resize="center-crop"
    )
    # The centre square of a 2:1 frame: its middle half; the red ramp (x) spans ~a quarter.
    red = centre[0, 0, 0] * augment.IMAGENET_STD[0] + augment.IMAGENET_MEAN[0]
    assert 0.25 < float(red[:, 0].mean()) < 0.5 and 0.5 < float(red[:, -1].mean()) < 0.75


def test_random_sampling_stores_every_frame_and_reads_one_per_segment(tmp_path: Path) -> None:
    folder = tmp_path / "d"
    rows = ["id,frames,label,split"]
    for i in range(2):
        clip = folder / f"v{i}"
        clip.mkdir(parents=True)
        for k in range(7):
            Image.fromarray(np.full((8, 8, 3), 30 * k + i, np.uint8)).save(clip / f"{k}.png")
        rows.append(f"v{i},v{i},{i},train")
    (folder / "m.csv").write_text("\n".join(rows) + "\n")
    opts = VisualOptions(frames=3, size=8, sampling="random", max_frames=6)
    fs = load_features(
        read_manifest(folder / "m.csv"), AUDIO, opts, tmp_path / "c", _quiet(), workers=1
    )
    assert fs.visual.shape == (2, 6, 3, 9, 9) and fs.visual_frames.tolist() == [6, 6]
    from bnfix.fusion.distributed import EpochBatch
    from bnfix.fusion.stages import _Rows

    rows_ = _Rows(fs, ("visual",))
    level = lambda b: (b["visual"][:, :, 0, 4, 4].int() // 30).tolist()  # noqa: E731
    # Stored: frames 0, 1, 2, 4, 5, 6 of 7 (6 kept, evenly); eval reads segment middles.
    assert level(rows_.__getitems__([0, 1])) == [[1, 4, 6], [1, 4, 6]]
    drawn = {tuple(level(rows_.__getitems__(EpochBatch([0], 7, e)))[0]) for e in range(30)}
    assert len(drawn) > 3 and all(a < b < c for a, b, c in drawn)
    # Pickled to a worker process (as spawn does): the file is mapped again, not copied, and
    # a batch's seed and epoch travel with it, so the worker draws the same frames.
    clone = pickle.loads(pickle.dumps(rows_))
    assert isinstance(clone.visual.array, np.memmap)
    batch = pickle.loads(pickle.dumps(EpochBatch([1, 0], 7, 3)))
    assert (batch.seed, batch.epoch) == (7, 3)
    assert torch.equal(
        clone.__getitems__(batch)["visual"], rows_.__getitems__(EpochBatch([1, 0], 7, 3))["visual"]
    )


# --- bad input -----------------------------------------------------------------------------------


def test_data_workers_zero_and_a_manifest_naming_a_text_file(tmp_path: Path) -> None:
    manifest = _wav_dataset(tmp_path / "d", 4)
    cfg = tmp_path / "c.toml"
    out = tmp_path / "out"
    cfg.write_text(f'[data]\nmanifest = "{manifest}"\nworkers = 0\n[run]\nout_dir = "{out}"\n')
    r = run_inprocess("fusion-tune", "--config", cfg)
    assert r.code == 2 and "data.workers" in one_error_line(r.stderr) and not out.exists()
    (tmp_path / "d" / "notes.txt").write_text("not media")
    bad = tmp_path / "d" / "bad.csv"
    bad.write_text("id,audio,label,split\nx,notes.txt,a,train\n")
    cfg.write_text(f'[data]\nmanifest = "{bad}"\n[run]\nout_dir = "{out}"\n')
    r = run_inprocess("fusion-tune", "--config", cfg)
    line = one_error_line(r.stderr)
    assert r.code == 2 and "row 1" in line and "'audio'" in line and ".txt" in line
    assert not out.exists() and not (tmp_path / "d" / ".bnfix-cache").exists()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("who", ["group", "main"])
def test_fusion_tune_killed_while_extracting_resumes_with_the_done_samples(
    tmp_path: Path, who: str
) -> None:
    """The real CLI, killed (SIGKILL) half-way through extraction; --resume starts the run,
    extracting only what the kill left, and it trains to the end. ``main``: only the run's
    own process is killed (as the OOM killer or a plain ``kill -9 PID`` does); its workers
    lived on, holding the store's lock, and the --resume waited on it in silence. The kill
    lands while the run is frozen (``_freeze_at``), so it lands half-way."""
    n = 120
    manifest = _wav_dataset(tmp_path / "d", n, seconds=2.0)
    config = tmp_path / "run.toml"
    config.write_text(
        f"""[data]
manifest = "{manifest}"
cache_dir = "{tmp_path / "cache"}"
workers = 2
[data.audio]
mel_bins = 16
target_frames = 64
[model]
audio_arch = "bnfix.fusion.synthetic:tiny_cnn"
[stage1]
epochs = 1
batch_size = 8
[run]
out_dir = "{tmp_path / "out"}"
"""
    )
    proc = subprocess.Popen(
        [BNFIX, "fusion-tune", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    index = _freeze_at(proc, tmp_path / "cache", 5)
    assert index is not None, proc.communicate()  # the run ended before five rows
    workers = _children(proc.pid)
    if who == "group":
        os.killpg(proc.pid, signal.SIGKILL)
    else:
        assert len(workers) >= 2, workers  # the pool is up
        os.kill(proc.pid, signal.SIGKILL)
        os.killpg(proc.pid, signal.SIGCONT)  # the workers run on, as after a real kill -9
    proc.wait()
    deadline = time.monotonic() + 30
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [w for w in workers if _alive(w)]  # the workers died with the run
    done = len([ln for ln in index.read_text().split("\n")[:-1] if ln])
    assert 5 <= done < n, done  # killed half-way
    r = run_inprocess("fusion-tune", "--config", config, "--resume")
    assert r.code == 0, r.stderr
    assert f"features: {n - done} extracted, {done} read from the store" in r.stdout + r.stderr
    assert (tmp_path / "out" / "summary.json").exists()


class _Deadly:
    """A kind whose compute kills its own process on some sources (as a decoder crashing on
    a damaged file, or the OOM killer, would) or hangs on one, and logs every computation to
    ``log``."""

    kind = "audio"

    def __init__(self, log: Path) -> None:
        self.log = log

    def prepare(self) -> None:
        pass

    def compute(self, source: str) -> Computed:
        with open(self.log, "a") as fh:
            fh.write(source + "\n")
        if source in ("segv", "oom"):
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file left behind
        if source == "segv":
            faulthandler.disable()  # pytest's traceback dump of a crash the test asks for
            os.kill(os.getpid(), signal.SIGSEGV)
        if source == "oom":
            os.kill(os.getpid(), signal.SIGKILL)
        if source == "hang":
            time.sleep(3600)
        return Computed(array=np.full((2, 3), float(source), np.float32), frames=1)


def test_a_sample_that_kills_its_worker_is_recorded_and_the_rest_extracted(tmp_path) -> None:
    """Two samples kill their worker process (SIGSEGV, SIGKILL): each is recorded with how
    its process died, the 30 others are extracted, and only jobs in flight at a death ran
    twice."""
    sources = [str(i) for i in range(30)]
    sources[7:7] = ["segv"]
    sources[20:20] = ["oom"]
    store = FeatureStore(tmp_path / "s", (2, 3), "<f4", {"p": 1})
    rows = store.allocate(sources)
    jobs = [Job(name, f"k{name}", name, rows[name]) for name in sources]
    kind = _Deadly(tmp_path / "computed.log")
    console = rich.console.Console(record=True, width=200, file=io.StringIO())
    workers = 2

    assert extract(kind, store, jobs, workers, console, timeout=60) == 32

    again = FeatureStore(tmp_path / "s", (2, 3), "<f4", {"p": 1})
    assert again.records["segv"].error == "decoding it killed its worker process (SIGSEGV)"
    assert again.records["oom"].error == (
        "decoding it killed its worker process (SIGKILL: out of memory?)"
    )
    data = again.array()
    for name in sources[:7] + sources[8:20] + sources[21:]:
        record = again.records[name]
        assert record.error is None and data[record.row].tolist() == [[float(name)] * 3] * 2
    computed = (tmp_path / "computed.log").read_text().split()
    assert computed.count("segv") == 2 and computed.count("oom") == 2  # in the pool, then alone
    assert set(computed) == set(sources)
    assert len(computed) <= len(sources) + 2 * 2 * workers  # a death retries <= 2 x workers
    # One round per death, or one for both when the second dies before the first is noticed
    # (a process dumping core is not dead until the core is written).
    assert console.export_text().count("a feature-extraction worker process died") in (1, 2)


def test_a_sample_that_hangs_is_given_up_after_the_timeout(tmp_path: Path) -> None:
    """A sample that never finishes: once nothing else is left, the pool's workers are killed,
    it gets the timeout again alone, then it is recorded as stuck; the others are extracted."""
    sources = [str(i) for i in range(10)]
    sources[3:3] = ["hang"]
    store = FeatureStore(tmp_path / "s", (2, 3), "<f4", {"p": 1})
    rows = store.allocate(sources)
    jobs = [Job(name, f"k{name}", name, rows[name]) for name in sources]
    console = rich.console.Console(record=True, width=200, file=io.StringIO())
    start = time.monotonic()

    assert extract(_Deadly(tmp_path / "computed.log"), store, jobs, 2, console, timeout=1.5) == 11

    assert time.monotonic() - start >= 3.0  # 1.5 s with nothing finishing, 1.5 s alone
    again = FeatureStore(tmp_path / "s", (2, 3), "<f4", {"p": 1})
    assert again.records["hang"].error == (
        "still decoding after 1.5 s (data.sample_timeout), given up"
    )
    assert all(again.records[name].error is None for name in sources if name != "hang")
    assert (tmp_path / "computed.log").read_text().split().count("hang") == 2
    assert "no feature-extraction job finished in 1.5 s" in console.export_text()


def test_fusion_tune_carries_on_when_a_worker_is_killed_mid_extraction(tmp_path: Path) -> None:
    """The real CLI extracting on 2 processes; one of them is SIGKILLed from outside (the OOM
    killer's way): the samples it had in flight are retried and the run ends normally."""
    manifest = _wav_dataset(tmp_path / "d", 120, seconds=2.0)
    config = tmp_path / "run.toml"
    changes = {
        "data": {"cache_dir": tmp_path / "cache", "workers": 2},
        "data.audio": {"target_frames": 64},
        "data.visual": None,
        "model": {"visual_arch": None},
        "stage1": {"lr": None},
        "stage2": None,
        "mask": None,
        "run": {"out_dir": tmp_path / "out"},
    }
    config.write_text(fusion_toml(manifest, changes))
    proc = subprocess.Popen(
        [BNFIX, "fusion-tune", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    killed = None
    if _freeze_at(proc, tmp_path / "cache", 3) is not None:  # the workers are busy
        workers = _children(proc.pid)
        if len(workers) == 2:
            killed = workers[0]
            os.kill(killed, signal.SIGKILL)
        os.killpg(proc.pid, signal.SIGCONT)
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert killed is not None and proc.returncode == 0, err
    assert "a feature-extraction worker process died" in out + err
    assert "features: 120 extracted" in out + err
    assert (tmp_path / "out" / "summary.json").exists()


def _children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (from /proc/*/stat: field 4 is the parent)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return sorted(found)


def test_dataloader_workers_and_official_pipeline_give_the_same_run(tmp_path: Path) -> None:
    """run.workers = 2 (forked DataLoader workers reading the stores, random frame picks drawn
    there) trains exactly as run.workers = 0, with the official visual pipeline."""
    from bnfix.fusion.config import config_from_toml
    from bnfix.fusion.run import fusion_tune
    from bnfix.fusion.synthetic import write_synthetic_av

    manifest = write_synthetic_av(
        tmp_path / "d", classes=2, per_class=6, seed=0, seconds=0.3, image_size=24, frames=4
    )
    metrics = {}
    for workers in (0, 2):
        changes = {
            "data": {"workers": 1},
            "data.visual": {
                "sampling": "random",
                "crop": "random-resized",
                "eval_resize": "full-frame",
            },
            "stage1": {"batch_size": 4, "lr": None},
            "stage2": {"epochs": 2, "batch_size": 4, "lr": None},
            "mask": {"visual_patch": [4, 4]},
            "run": {"out_dir": tmp_path / f"out{workers}", "workers": workers},
        }
        text = fusion_toml(manifest, changes)
        fusion_tune(config_from_toml(text, tmp_path), console=_quiet(), plot=False)
        lines = (tmp_path / f"out{workers}" / "metrics.jsonl").read_text().splitlines()
        metrics[workers] = [
            {k: v for k, v in json.loads(line).items() if k not in ("samples_per_s", "seconds")}
            for line in lines
        ]
    assert len(metrics[0]) == 4 and metrics[0] == metrics[2]


def test_loader_workers_default_to_none_on_the_cpu_and_a_few_on_cuda() -> None:
    from bnfix.fusion.extract import default_workers
    from bnfix.fusion.stages import loader_workers

    assert loader_workers(None, False, 1) == 0 and loader_workers(3, False, 1) == 3
    cores = default_workers()
    assert loader_workers(None, True, 1) == max(1, min(4, cores - 1))
    assert loader_workers(None, True, 10 * cores) == 1 and loader_workers(0, True, 1) == 0
