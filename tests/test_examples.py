"""The use-case scripts under examples/ run as a user runs them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
import torchvision

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_abri_finetune_example_folds_into_the_stock_architecture(tmp_path, mobilenet_v2_path):
    done = subprocess.run(
        [sys.executable, EXAMPLES / "abri_finetune.py", "--steps", "1", "--out", tmp_path],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr
    deviation = float(done.stdout.split("max deviation ")[1].split()[0])
    assert deviation <= 1e-5 and "0 ABRi blocks left" in done.stdout
    stock = torchvision.models.mobilenet_v2(num_classes=4)
    stock.features[0][0] = torch.nn.Conv2d(1, 32, 3, 2, 1, bias=False)
    stock.load_state_dict(torch.load(tmp_path / "audio_encoder.folded.pt"), strict=True)


def test_video_scan_example_runs_on_generated_clips():
    done = subprocess.run(
        [
            sys.executable,
            EXAMPLES / "scan_video_model.py",
            "--clip-frames",
            "4",
            "--clip-size",
            "32",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("r2plus1d_18: 4 clips of 4 frames;")
    assert "recommendation: " in done.stdout
