"""run.tensorboard: every per-epoch scalar of metrics.jsonl as TensorBoard curves, read back
with tensorboard's own event reader, exactly once per (tag, step), also across kills and resumes.

Small on purpose: 12 generated clips, the tiny CNN, 2 epochs per phase, all in process (the
stop hook's ``os._exit`` raises instead, after the same writes a kill would leave).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import one_error_line, run_inprocess
from rich.console import Console
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.util import tensor_util
from test_fusion_train import TIMING, read_metrics, write_config

from bnfix.fusion import run as run_module
from bnfix.fusion.config import load_config
from bnfix.fusion.run import STOP_AFTER_ENV, fusion_tune
from bnfix.fusion.synthetic import write_synthetic_av

IDENTIFIERS = ("phase", "stage", "epoch")


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tb-data")
    return write_synthetic_av(folder, classes=2, per_class=6, seed=1, seconds=0.3, image_size=40)


def tb_config(folder: Path, manifest: Path) -> Path:
    config = write_config(folder, manifest, epochs1=2, epochs2=2)
    config.write_text(config.read_text() + "tensorboard = true\n")
    return config


def event_points(folder: Path) -> dict[tuple[str, int], list[float]]:
    """(tag, step) -> every value written for it, over all event files of the folder."""
    points: dict[tuple[str, int], list[float]] = {}
    files = sorted(folder.glob("events.out.tfevents.*"))
    assert files, f"no event files in {folder}"
    for path in files:
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                number = float(tensor_util.make_ndarray(value.tensor))
                points.setdefault((value.tag, event.step), []).append(number)
    return points


def expected_points(records: list[dict]) -> dict[tuple[str, int], float]:
    """Every numeric leaf of every record, as float32 (TensorBoard's scalar precision)."""
    expected = {}
    for r in records:
        for key, value in r.items():
            if key in IDENTIFIERS or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            expected[(f"{r['phase']}/{key}", r["epoch"])] = float(np.float32(value))
    return expected


def check_mirror(out: Path, replayed_timing_ok: bool = False) -> dict:
    records = read_metrics(out)
    expected = expected_points(records)
    points = event_points(out / "tensorboard")
    assert set(points) == set(expected)
    duplicates = {k: v for k, v in points.items() if len(v) != 1}
    assert not duplicates
    for key, value in expected.items():
        if replayed_timing_ok and key[0].rsplit("/", 1)[-1] in TIMING:
            continue  # a replayed epoch's timing differs from the first try's, which stays
        assert points[key] == [value], key
    return points


class _Stopped(Exception):
    pass


class _OsThatRaises:
    """``os`` as run.py sees it, whose ``_exit`` raises: only the stop hook changes (a global
    patch of ``os._exit`` would also reach forked worker processes, which exit through it)."""

    def __getattr__(self, name: str) -> object:
        return getattr(os, name)

    @staticmethod
    def _exit(code: int) -> None:
        raise _Stopped(code)


def test_every_epoch_scalar_once_with_its_value_across_kills_and_resumes(
    small_set: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tb_config(tmp_path, small_set)
    out = tmp_path / "out"
    quiet = Console(quiet=True)
    monkeypatch.setattr(run_module, "os", _OsThatRaises())
    # Stopped after 3 of 6 epochs (stage1/visual epoch 1), TensorBoard not yet asked for ...
    monkeypatch.setenv(STOP_AFTER_ENV, "3")
    with pytest.raises(_Stopped):
        fusion_tune(load_config(config, ["run.tensorboard=false"]), console=quiet, plot=False)
    assert not (out / "tensorboard").exists()
    saved = tmp_path / "visual-epoch1.pt"
    shutil.copy(out / "stage1" / "visual" / "last.pt", saved)
    # ... resumed with it: the 3 epochs so far are written from metrics.jsonl, then epoch 2 of
    # stage1/visual; put back epoch 1's checkpoint, as a kill between the metrics line (and
    # its curves) and the checkpoint would leave the folder.
    monkeypatch.setenv(STOP_AFTER_ENV, "1")
    with pytest.raises(_Stopped):
        fusion_tune(load_config(config), resume=True, console=quiet, plot=False)
    check_mirror(out)
    assert {step for tag, step in event_points(out / "tensorboard") if "visual" in tag} == {1, 2}
    shutil.copy(saved, out / "stage1" / "visual" / "last.pt")
    # The resumed run replays stage1/visual epoch 2 (same numbers on the CPU) and finishes.
    monkeypatch.delenv(STOP_AFTER_ENV)
    fusion_tune(load_config(config), resume=True, console=quiet, plot=False)
    assert [(r["phase"], r["epoch"]) for r in read_metrics(out)] == [
        (phase, epoch) for phase in ("stage1/audio", "stage1/visual", "stage2") for epoch in (1, 2)
    ]
    points = check_mirror(out, replayed_timing_ok=True)
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2
    assert {tag.rsplit("/", 1)[0] for tag, _ in points} == {
        "stage1/audio",
        "stage1/visual",
        "stage2",
    }
    for tag in ("stage1/audio/train_loss", "stage1/visual/val_acc", "stage2/val_acc_audio",
                "stage2/val_acc_visual", "stage2/lr", "stage2/samples_per_s",
                "stage1/audio/confidence_ids"):  # fmt: skip
        assert {step for t, step in points if t == tag} == {1, 2}, tag
    assert not any(tag.endswith(("/epoch", "/stage", "/modality")) for tag, _ in points)
    # A stage 2 redone with --force: its old curves go, stage 1's are rebuilt, nothing twice.
    fusion_tune(load_config(config), stage="2", force=True, console=quiet, plot=False)
    check_mirror(out)


def test_asking_without_the_tensorboard_package_is_one_line_and_writes_nothing(
    small_set: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tb_config(tmp_path, small_set)
    cache = tmp_path / "cache"
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    result = run_inprocess("fusion-tune", "--config", config, f"data.cache_dir={cache}")
    assert result.code == 2
    assert "needs the tensorboard package: pip install 'bnfix[tensorboard]'" in one_error_line(
        result.stderr
    )
    assert not (tmp_path / "out").exists() and not cache.exists()


def test_a_bad_tensorboard_value_is_one_line(small_set: Path, tmp_path: Path) -> None:
    config = tb_config(tmp_path, small_set)
    result = run_inprocess("fusion-tune", "--config", config, "run.tensorboard=yes")
    assert result.code == 2
    line = one_error_line(result.stderr)
    assert "run.tensorboard must be true or false (got 'yes' from the command line)" in line
    assert not (tmp_path / "out").exists()
