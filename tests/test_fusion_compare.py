"""fusion-tune comparisons: paired arms, seeds with intervals, OGM-GE, the stage-1 ensemble,
Shapley contributions and plots.

One small generated set (3 classes, 24 clips, tiny CNNs, 16x32 spectrograms, 24-pixel frames)
and one shared multi-arm run keep the file fast on two CPU cores; the numbers asserted are
the runs' own or computed by hand here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from rich.console import Console

from bnfix.fusion.config import load_config
from bnfix.fusion.run import fusion_tune
from bnfix.fusion.synthetic import write_synthetic_av

TINY = "bnfix.fusion.synthetic:tiny_cnn"
TIMING = ("samples_per_s", "seconds")
ARM_KEYS = ("phase", "rule", "arm")
CONFIG = """\
[data]
manifest = "{manifest}"
cache_dir = "{cache}"

[data.audio]
mel_bins = 16
target_frames = 32

[data.visual]
frames = 2
size = 24

[model]
audio_arch = "{arch}"
visual_arch = "{arch}"

[stage1]
epochs = 2
batch_size = 8
lr = 0.05

[stage2]
epochs = 2
batch_size = 8
lr = 0.02

[mask]
tau = 0.0
audio_patch = [8, 4]
visual_patch = [6, 6]

[run]
out_dir = "out"
"""


def quiet() -> Console:
    return Console(record=True, width=200, file=open(os.devnull, "w"))


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def stripped(records: list[dict], drop: tuple[str, ...] = TIMING + ARM_KEYS) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in drop} for r in records]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """24 clips of 3 classes (12 train, 6 val, 6 test) and their feature cache folder."""
    folder = tmp_path_factory.mktemp("data")
    write_synthetic_av(
        folder, classes=3, per_class=8, seed=0, seconds=0.4, image_size=28, frames=2,
        splits=("train", "train", "val", "test"),
    )  # fmt: skip
    config = folder / "fusion.toml"
    config.write_text(
        CONFIG.format(manifest=folder / "manifest.csv", cache=folder / "cache", arch=TINY)
    )
    return folder


def test_two_arms_that_train_identically_give_identical_numbers(data: Path, tmp_path: Path):
    """mask.rho = 0: the adaptive rule masks nothing, so it trains exactly as rule none."""
    out = tmp_path / "out"
    config = load_config(data / "fusion.toml", ["mask.rho=0", f"run.out_dir={out}"])
    summary = fusion_tune(config, compare=True, console=quiet())
    compare = summary["compare"]
    assert set(compare) == {"none", "adaptive"}
    for key in ("test", "probe"):
        assert compare["adaptive"][key] == compare["none"][key]
    records = read_metrics(out)
    arms = {p: [r for r in records if r["phase"] == p] for p in ("stage2", "stage2-none")}
    assert len(arms["stage2"]) == 2
    assert stripped(arms["stage2"]) == stripped(arms["stage2-none"])
