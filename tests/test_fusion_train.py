"""fusion-tune end to end: real files, real models, the real CLI (and torchrun) as subprocesses.

Small on purpose (a 4-layer CNN, 32-pixel frames, 64-frame spectrograms) so the whole file
runs in well under a minute on two CPU cores; the numbers asserted are the run's own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from helpers import TINY, fusion_toml, run_cli
from rich.console import Console

from bnfix.abri import ABRiBatchNorm2d, convert
from bnfix.architectures import build_model
from bnfix.checkpoint import load_checkpoint
from bnfix.errors import BnfixError
from bnfix.fusion.config import load_config
from bnfix.fusion.model import FusionModel, build_encoder
from bnfix.fusion.run import STOP_AFTER_ENV, STOPPED_EXIT, fusion_tune
from bnfix.fusion.synthetic import write_synthetic_av

TIMING = ("samples_per_s", "seconds")


def write_config(folder: Path, manifest: Path, epochs1: int = 4, epochs2: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "fusion.toml"
    changes = {
        "data.audio": {"mel_bins": 32, "target_frames": 64},
        "data.visual": {"size": 32},
        "stage1": {"epochs": epochs1},
        "stage2": {"epochs": epochs2},
        "mask": {"audio_patch": [16, 8]},
    }
    path.write_text(fusion_toml(manifest, changes))
    return path


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def train_ids(manifest: Path) -> set[str]:
    rows = manifest.read_text().splitlines()[1:]
    return {r.split(",")[0] for r in rows if r.endswith(",train")}


@pytest.fixture(scope="module")
def av_set(tmp_path_factory) -> Path:
    """80 clips of 4 classes: tones (the easy modality) and tinted squares (the hard one)."""
    folder = tmp_path_factory.mktemp("av")
    return write_synthetic_av(folder, classes=4, per_class=20, seed=0, seconds=0.7, image_size=40)


@pytest.fixture(scope="module")
def reference(av_set: Path, tmp_path_factory) -> Path:
    """One uninterrupted run with --compare: the result the other tests compare against."""
    config = write_config(tmp_path_factory.mktemp("reference"), av_set)
    result = run_cli("fusion-tune", "--config", config, "--compare", cwd=config.parent)
    assert result.code == 0, result.stderr
    (config.parent / "stdout.txt").write_text(result.stdout)
    return config.parent


def test_end_to_end_learns_from_both_modalities(reference: Path, av_set: Path) -> None:
    out = reference / "out"
    summary = json.loads((out / "summary.json").read_text())
    chance = 0.25
    assert summary["stage1"]["audio"]["test"] >= 0.7  # the easy modality
    assert summary["stage1"]["visual"]["test"] >= 0.5  # the hard one, still well above chance
    assert summary["stage2"]["test"]["fused"] >= 0.8
    assert min(summary["stage2"]["probe"].values()) >= 0.6
    assert summary["stage2"]["test"]["fused"] > chance + 0.5
    # Audio is the easy modality, so the adaptive rule masks mostly audio.
    mask = summary["mask"]
    assert mask["rule"] == "adaptive"
    assert mask["audio_masked_fraction"] > mask["visual_masked_fraction"]
    assert 0 < mask["mean_ratio_audio"] <= 0.5
    # metrics.jsonl: one line per epoch and phase, in order.
    records = read_metrics(out)
    phases = [(r["phase"], r["epoch"]) for r in records]
    assert phases == (
        [("stage1/audio", e) for e in (1, 2, 3, 4)]
        + [("stage1/visual", e) for e in (1, 2, 3, 4)]
        + [("stage2", e) for e in (1, 2, 3)]
        + [("stage2-none", e) for e in (1, 2, 3)]
    )
    assert all(r["samples_per_s"] > 0 for r in records)
    assert {r["modality"] for r in records if r["stage"] == 1} == {"audio", "visual"}
    assert {r["rule"] for r in records if r["stage"] == 2} == {"adaptive", "none"}
    # Confidences: every training id, each recorded once per epoch, nothing else.
    ids = train_ids(av_set)
    assert all(r["confidence_ids"] == len(ids) for r in records if r["stage"] == 1)
    confidence = json.loads((out / "stage1" / "confidence.json").read_text())
    assert set(confidence) == {"audio", "visual"}
    for table in confidence.values():
        assert set(table) == ids
        assert all(0 < p < 1 for p in table.values())


def test_compare_prints_both_rules_side_by_side(reference: Path) -> None:
    summary = json.loads((reference / "out" / "summary.json").read_text())
    compare = summary["compare"]
    assert set(compare) == {"none", "adaptive"}
    assert compare["none"]["mask"]["audio_masked_fraction"] == 0
    assert compare["adaptive"]["test"] == summary["stage2"]["test"]
    for rule in compare.values():
        assert set(rule["test"]) == {"fused", "audio", "visual"}
        assert set(rule["probe"]) == {"audio", "visual"}
    stdout = (reference / "stdout.txt").read_text()
    header = next(line for line in stdout.splitlines() if "rule none" in line)
    assert "rule adaptive" in header
    fused = next(line for line in stdout.splitlines() if line.strip("│ ").startswith("fused"))
    assert f"{100 * compare['none']['test']['fused']:.1f}%" in fused
    assert f"{100 * compare['adaptive']['test']['fused']:.1f}%" in fused


def test_run_folder_holds_config_checkpoints_and_stock_layout_exports(reference: Path) -> None:
    out = reference / "out"
    saved = (out / "config.toml").read_text()
    assert "seed 0" in saved and "torch " in saved and "torchvision " in saved
    # The resolved config: the file's values plus the audio normalisation computed from train.
    norm = json.loads((out / "summary.json").read_text())["audio_normalisation"]
    stats = [f"data.audio.mean={norm['mean']!r}", f"data.audio.std={norm['std']!r}"]
    assert load_config(out / "config.toml") == load_config(reference / "fusion.toml", stats)
    for phase in ("stage1/audio", "stage1/visual", "stage2", "stage2-none"):
        assert (out / phase / "last.pt").is_file() and (out / phase / "best.safetensors").is_file()
    # A stage-1 best checkpoint is a plain checkpoint of the architecture with 4 outputs.
    visual = load_checkpoint(out / "stage1" / "visual" / "best.safetensors")
    model, recognition = build_model(visual.state_dict, TINY)
    assert recognition.num_classes == 4 and recognition.in_channels == 3
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 4)
    audio = load_checkpoint(out / "stage1" / "audio" / "best.safetensors")
    assert build_model(audio.state_dict, TINY)[1].in_channels == 1
    joint = load_checkpoint(out / "stage2" / "best.safetensors").state_dict
    assert joint["head.weight"].shape == (4, 128)  # two 64-d encoders, concatenated
    assert {k.split(".")[0] for k in joint} == {"audio", "visual", "head"}


@pytest.mark.parametrize(
    ("options", "overrides", "expected"),
    [
        (
            {},
            [],
            "run.out_dir is not empty (classes.json, config.toml, metrics.jsonl, …): pass --resume",
        ),
        ({"stage": "2"}, [], "stage2 already exists: pass --resume to continue it or --force"),
        ({"resume": True}, ["stage2.lr=0.5"], "config differs from the earlier run's (stage2.lr)"),
        ({"resume": True, "force": True}, [], "--resume and --force contradict each other"),
    ],
)
def test_a_finished_run_is_neither_clobbered_nor_continued_differently(
    reference: Path, options: dict, overrides: list[str], expected: str
) -> None:
    before = sorted(p.name for p in (reference / "out").rglob("*"))
    config = load_config(reference / "fusion.toml", overrides)
    with pytest.raises(BnfixError) as info:
        fusion_tune(config, compare=True, console=Console(quiet=True), **options)
    assert expected in str(info.value)
    assert sorted(p.name for p in (reference / "out").rglob("*")) == before


def run_with_stop(config: Path, stop_after: int | None, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    if stop_after is not None:
        env[STOP_AFTER_ENV] = str(stop_after)
    bnfix = Path(sys.executable).with_name("bnfix")
    return subprocess.run(
        [bnfix, "fusion-tune", "--config", config, *args],
        capture_output=True,
        text=True,
        cwd=config.parent,
        env=env,
        timeout=900,
    )


def test_stopped_and_resumed_run_ends_with_the_uninterrupted_metrics(
    reference: Path, av_set: Path, tmp_path: Path
) -> None:
    config = write_config(tmp_path, av_set)
    out = tmp_path / "out"
    # Stopped in the middle of stage 1 (audio, after 2 of 4 epochs) ...
    first = run_with_stop(config, 2, "--compare")
    assert first.returncode == STOPPED_EXIT, first.stderr
    assert len(read_metrics(out)) == 2
    assert not (out / "summary.json").exists()
    # ... resumed and stopped again inside stage 2 (2 + 4 audio/visual + 5 = epoch 1 of stage 2)
    second = run_with_stop(config, 7, "--compare", "--resume")
    assert second.returncode == STOPPED_EXIT, second.stderr
    assert "resuming stage1/audio after epoch 2" in second.stdout
    assert [r["phase"] for r in read_metrics(out)][-1] == "stage2"
    # A line written after the last checkpoint (a kill between the two) is dropped on resume.
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"phase": "stage2", "stage": 2, "epoch": 2, "train_loss": 9}) + "\n")
    # The run folder can be moved before it is resumed.
    out = out.rename(tmp_path / "moved")
    third = run_with_stop(config, None, "--compare", "--resume", f"run.out_dir={out}")
    assert third.returncode == 0, third.stderr
    assert "resuming stage2 after epoch 1" in third.stdout
    expected = without_timing(read_metrics(reference / "out"))
    assert without_timing(read_metrics(out)) == expected
    summary = json.loads((out / "summary.json").read_text())
    reference_summary = json.loads((reference / "out" / "summary.json").read_text())
    assert summary == reference_summary
    assert (out / "stage1" / "confidence.json").read_text() == (
        reference / "out" / "stage1" / "confidence.json"
    ).read_text()


def test_one_modality_manifest_runs_stage1_alone(tmp_path: Path) -> None:
    manifest = write_synthetic_av(
        tmp_path / "data", classes=3, per_class=10, modalities=("audio",), seconds=0.5
    )
    assert "frames" not in manifest.read_text().splitlines()[0]
    config = write_config(tmp_path, manifest, epochs1=2)
    result = run_cli("fusion-tune", "--config", config, cwd=tmp_path)
    assert result.code == 0, result.stderr
    out = tmp_path / "out"
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["stage1"]) == {"audio"} and "stage2" not in summary
    assert sorted(p.name for p in (out / "stage1").iterdir()) == ["audio", "confidence.json"]
    assert {r["phase"] for r in read_metrics(out)} == {"stage1/audio"}
    assert set(json.loads((out / "stage1" / "confidence.json").read_text())["audio"]) == (
        train_ids(manifest)
    )
    with pytest.raises(BnfixError, match="--stage 2 needs audio and visual"):
        fusion_tune(load_config(config), stage="2", console=Console(quiet=True))


def test_torchrun_two_processes_record_each_confidence_once(tmp_path: Path) -> None:
    """15 training samples over 2 ranks: the sampler pads one, which must count once."""
    manifest = write_synthetic_av(tmp_path / "data", classes=3, per_class=7, seconds=0.5)
    ids = train_ids(manifest)
    assert len(ids) == 15
    config = write_config(tmp_path, manifest, epochs1=2, epochs2=1)
    torchrun = Path(sys.executable).with_name("torchrun")
    done = subprocess.run(
        # --standalone: a free port on localhost, so a busy 29500 on the CI machine cannot break it
        [
            torchrun,
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "bnfix",
            "fusion-tune",
            "--config",
            config,
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"},
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "x 2 processes" in done.stdout
    assert done.stdout.count("wrote ") == 1  # only rank 0 prints
    out = tmp_path / "out"
    stage1 = [r for r in read_metrics(out) if r["stage"] == 1]
    assert len(stage1) == 4
    assert all(r["confidence_ids"] == 15 for r in stage1)
    assert all(r["confidence_repeats_dropped"] == 1 for r in stage1)
    confidence = json.loads((out / "stage1" / "confidence.json").read_text())
    assert set(confidence["audio"]) == ids and set(confidence["visual"]) == ids
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["stage2"]["test"]) == {"fused", "audio", "visual"}


# --------------------------------------------------------------------------------------------
# Encoders (in process: real torchvision models, no training)


def test_pretrained_stems_are_adapted_and_classifiers_removed(tmp_path: Path) -> None:
    torch.manual_seed(0)
    rgb = torchvision.models.resnet18(num_classes=10)
    torch.save({"state_dict": rgb.state_dict()}, tmp_path / "rgb.pt")
    encoder, info = build_encoder("audio", "auto", tmp_path / "rgb.pt", (1, 64, 32))
    stem = encoder.backbone.conv1.weight
    assert stem.shape == (64, 1, 7, 7)
    assert torch.allclose(stem, rgb.conv1.weight.sum(dim=1, keepdim=True))
    assert isinstance(encoder.backbone.fc, torch.nn.Identity) and encoder.head_path == "fc"
    assert info.dim == 512 and any("summed" in note for note in info.notes)
    # The paper's audio layout (1-channel stem, no classifier) as a visual encoder.
    audio_state = {k: v for k, v in rgb.state_dict().items() if not k.startswith("fc.")}
    audio_state["conv1.weight"] = rgb.conv1.weight[:, :1].clone()
    torch.save(audio_state, tmp_path / "audio.pt")
    visual, _ = build_encoder("visual", "resnet18", tmp_path / "audio.pt", (3, 32, 32))
    expected = audio_state["conv1.weight"].repeat(1, 3, 1, 1) / 3
    assert torch.equal(visual.backbone.conv1.weight, expected)
    assert visual.head_path == "fc" and visual.dim == 512
    # An ABRi-repaired checkpoint keeps its blocks (pretrained BN + fresh BN + alpha).
    convert(rgb)
    torch.save(rgb.state_dict(), tmp_path / "abri.pt")
    repaired, _ = build_encoder("audio", "resnet18", tmp_path / "abri.pt", (1, 64, 32))
    assert isinstance(repaired.backbone.bn1, ABRiBatchNorm2d)
    assert repaired(torch.randn(2, 1, 64, 32)).shape == (2, 512)


def test_scratch_stems_take_the_modality_channels_for_any_classifier_layout() -> None:
    torch.manual_seed(0)
    encoder, info = build_encoder("audio", "mobilenet_v3_small", "scratch", (1, 64, 32))
    assert encoder.head_path == "classifier.3"  # the last Linear, not the hidden one
    assert info.dim == 1024
    assert encoder(torch.randn(2, 1, 64, 32)).shape == (2, 1024)
    with pytest.raises(BnfixError, match="did you mean resnet18"):
        build_encoder("audio", "resnet81", "scratch", (1, 64, 32))


def test_visual_encoder_pools_frames_and_partial_logits_zero_the_other_half() -> None:
    torch.manual_seed(0)
    audio, _ = build_encoder("audio", TINY, "scratch", (1, 32, 16))
    visual, _ = build_encoder("visual", TINY, "scratch", (3, 16, 16))
    model = FusionModel(audio, visual, classes=5).eval()
    a, v = torch.randn(3, 1, 32, 16), torch.randn(3, 4, 3, 16, 16)
    with torch.no_grad():
        frames = torch.stack([visual(v[:, t : t + 1]) for t in range(4)])
        logits, fa, fv = model(a, v)
        la, lv = model.partial_logits(fa, fv)
        assert torch.allclose(fv, frames.mean(dim=0), atol=1e-6)
        assert torch.allclose(la, model.head(torch.cat([fa, torch.zeros_like(fv)], 1)), atol=1e-6)
        assert torch.allclose(lv, model.head(torch.cat([torch.zeros_like(fa), fv], 1)), atol=1e-6)
        assert torch.allclose(logits, la + lv - model.head.bias, atol=1e-5)


def test_an_out_dir_that_cannot_be_made_is_refused_before_any_work(av_set: Path, tmp_path: Path):
    config = write_config(tmp_path, av_set)
    with pytest.raises(BnfixError, match=r"run\.out_dir: cannot create the folder"):
        fusion_tune(
            load_config(config, ["run.out_dir=/proc/bnfix-run"]), console=Console(quiet=True)
        )
