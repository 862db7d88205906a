"""fusion-tune regressions: each test failed on the code before its fix (real runs, no mocks).

Two small generated data sets keep the file fast on two CPU cores: a 30-clip audio-visual set
with integer labels (one full run, stage 1 and stage 2, shared by several tests) and an 18-clip
audio-only set (a run stopped after its first epoch, resumed in several ways, against an
uninterrupted reference).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TINY, fusion_toml, run_cli, run_inprocess
from rich.console import Console
from safetensors.torch import save_file

from bnfix.checkpoint import load_checkpoint
from bnfix.errors import BnfixError
from bnfix.fusion import masking
from bnfix.fusion.config import load_config
from bnfix.fusion.manifest import read_manifest
from bnfix.fusion.model import build_encoder
from bnfix.fusion.run import STOP_AFTER_ENV, STOPPED_EXIT, check_out_dir, fusion_tune
from bnfix.fusion.synthetic import tiny_cnn, write_synthetic_av
from bnfix.probe_audio import AudioOptions, features_with_length, read_audio

TIMING = ("samples_per_s", "seconds")


def write_config(folder: Path, manifest: Path, epochs1: int = 3, batch: int = 8) -> Path:
    path = folder / "fusion.toml"
    changes = {
        "data.audio": {"mel_bins": 32, "target_frames": 64},
        "data.visual": {"size": 32},
        "stage1": {"epochs": epochs1, "batch_size": batch},
        "stage2": {"epochs": 2},
        "mask": {"tau": 0.0, "audio_patch": [32, 32]},
    }
    path.write_text(fusion_toml(manifest, changes))
    return path


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes: 'nothing written' means this is unchanged."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def quiet() -> Console:
    return Console(record=True, width=200, file=open(os.devnull, "w"))


# --------------------------------------------------------------------------------------------
# The audio-visual run: integer labels, half-precision inits, N = 2 audio patches


LABELS = {"class0": "0", "class1": "5", "class2": "1000"}


@pytest.fixture(scope="module")
def av_run(tmp_path_factory) -> Path:
    """30 clips, labels 0 / 5 / 1000, plus 7 on two val/test rows only.

    audio_patch [32, 32] on 64x32 spectrograms gives N = 2 patches, and ratios stay below
    rho = 0.5, so floor(2 r) = 0: audio is never masked although its ratios are positive (tau
    = 0: every sample whose audio confidence beats the visual one gets a ratio).
    """
    folder = tmp_path_factory.mktemp("av")
    manifest = write_synthetic_av(
        folder / "data", classes=3, per_class=10, seed=0, seconds=0.5, image_size=40, frames=2
    )
    with open(manifest, newline="") as fh:
        rows = list(csv.DictReader(fh))
    moved = 0
    for row in rows:
        row["label"] = LABELS[row["label"]]
        if row["split"] != "train" and row["label"] == "5" and moved < 2:
            row["label"], moved = "7", moved + 1
    with open(manifest, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    config = write_config(folder, manifest)
    result = run_cli("fusion-tune", "--config", config, cwd=folder)
    assert result.code == 0, result.stderr
    (folder / "stdout.txt").write_text(result.stdout)
    return folder


def test_integer_labels_get_dense_indices_saved_and_printed(av_run: Path) -> None:
    out = av_run / "out"
    expected = {"labels": {"0": 0, "5": 1, "7": 2, "1000": 3}, "without_training": ["7"]}
    assert json.loads((out / "classes.json").read_text()) == expected
    summary = json.loads((out / "summary.json").read_text())
    assert summary["classes"] == expected
    stdout = (av_run / "stdout.txt").read_text()
    assert "30 samples (18 train, 6 val, 6 test), 4 classes" in stdout
    assert "classes (label→index): 0→0, 5→1, 7→2, 1000→3" in stdout
    assert "warning: 1 class(es) with no training rows" in stdout and stdout.count(": 7\n") == 1
    # The heads have 4 outputs, not 1001.
    audio = load_checkpoint(out / "stage1" / "audio" / "best.safetensors").state_dict
    assert audio["14.weight"].shape == (4, 64)
    assert load_checkpoint(out / "stage2" / "best.safetensors").state_dict["head.weight"].shape == (
        4,
        128,
    )


def test_manifest_integer_labels_are_dense_and_sorted_by_value(tmp_path: Path) -> None:
    wav = tmp_path / "a.wav"
    wav.write_bytes(b"")  # the manifest checks that files exist; decoding happens later
    labels = ["1000000", "0", "5", "10", "9"] * 6  # 30 clips
    rows = [f"s{i},a.wav,{label},{'train' if i % 3 else 'test'}" for i, label in enumerate(labels)]
    (tmp_path / "m.csv").write_text("id,audio,label,split\n" + "\n".join(rows) + "\n")
    m = read_manifest(tmp_path / "m.csv")
    assert m.classes == ["0", "5", "9", "10", "1000000"]  # by value, not as strings
    assert [s.label for s in m.samples[:5]] == [4, 0, 1, 3, 2]


def test_two_spellings_of_one_integer_label_are_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "a.wav").write_bytes(b"")
    rows = ["a,a.wav,1,train", "b,a.wav,2,train", "c,a.wav,01,test"]
    (tmp_path / "m.csv").write_text("id,audio,label,split\n" + "\n".join(rows) + "\n")
    with pytest.raises(BnfixError) as info:
        read_manifest(tmp_path / "m.csv")
    message = str(info.value)
    assert "row 3" in message and "'01'" in message and "'1'" in message and "row 1" in message
    assert "\n" not in message


def test_audio_normalisation_is_recorded_in_config_summary_and_encoders(av_run: Path) -> None:
    out = av_run / "out"
    summary = json.loads((out / "summary.json").read_text())
    norm = summary["audio_normalisation"]
    assert norm["formula"] == "(fbank - mean) / (2 * std)"
    # Independently: the train split's fbank statistics, from the WAV files.
    opts = AudioOptions(sample_rate=16000, num_mel_bins=32, target_frames=64)
    train = [
        s for s in read_manifest(av_run / "data" / "manifest.csv").samples if s.split == "train"
    ]
    fbanks = []
    for sample in train:
        wave, rate = read_audio(sample.audio, opts)
        fbank, frames = features_with_length(wave, rate, opts)
        fbanks.append(fbank[:frames].double())
    values = torch.cat([f.flatten() for f in fbanks])
    assert norm["mean"] == pytest.approx(float(values.mean()), rel=1e-9)
    assert norm["std"] == pytest.approx(float(values.std(unbiased=False)), rel=1e-9)
    saved = load_config(out / "config.toml")
    assert (saved.data.audio.mean, saved.data.audio.std) == (norm["mean"], norm["std"])
    assert (
        "data.audio.mean and data.audio.std from the training split"
        in (out / "config.toml").read_text()
    )
    for phase in ("stage1/audio", "stage2"):
        meta = load_checkpoint(out / phase / "best.safetensors").metadata
        assert float(meta["audio_mean"]) == norm["mean"]
        assert float(meta["audio_std"]) == norm["std"]
        assert meta["audio_mel_bins"] == "32" and meta["audio_target_frames"] == "64"
    visual = load_checkpoint(out / "stage1" / "visual" / "best.safetensors").metadata
    assert "audio_mean" not in visual and visual["visual_size"] == "32"


def _pick(records: list[dict]) -> int:
    """Best epoch: highest val accuracy, then lowest val loss, then the later epoch."""
    return max(records, key=lambda r: (r["val_acc"], -r["val_loss"], r["epoch"]))["epoch"]


def test_best_epoch_ties_go_to_lower_val_loss_then_the_later_epoch(av_run: Path) -> None:
    out = av_run / "out"
    records = read_metrics(out)
    phases = ("stage1/audio", "stage1/visual", "stage2")
    own = {p: [r for r in records if r["phase"] == p] for p in phases}
    results = {p: json.loads((out / p / "result.json").read_text()) for p in phases}
    assert {p: r["best_epoch"] for p, r in results.items()} == {p: _pick(own[p]) for p in phases}
    first_of_tied = {
        p: next(r for r in own[p] if r["val_acc"] == results[p]["val"]) for p in phases
    }
    # A tie happened, and the earliest of the tied epochs was not kept.
    assert any(first_of_tied[p]["epoch"] != results[p]["best_epoch"] for p in phases)
    for phase, result in results.items():
        assert result["val"] == max(r["val_acc"] for r in own[phase])
        best = next(r for r in own[phase] if r["epoch"] == result["best_epoch"])
        assert result["val_loss"] == best["val_loss"]
        meta = load_checkpoint(out / phase / "best.safetensors").metadata
        assert meta["epoch"] == str(result["best_epoch"])  # the checkpoint is that epoch's


def test_masked_fraction_counts_only_samples_that_lose_a_patch(av_run: Path) -> None:
    out = av_run / "out"
    mask = json.loads((out / "summary.json").read_text())["mask"]
    conf = json.loads((out / "stage1" / "confidence.json").read_text())
    ids = sorted(conf["audio"])
    c_a = torch.tensor([conf["audio"][i] for i in ids], dtype=torch.float64)
    c_v = torch.tensor([conf["visual"][i] for i in ids], dtype=torch.float64)
    r_a, r_v = masking.mask_ratios(c_a, c_v, "adaptive", 0.0, (2.0, 2.0), (0.5, 0.5))
    assert mask["mean_ratio_audio"] > 0 and float((r_a > 0).double().mean()) > 0
    assert mask["audio_masked_fraction"] == 0.0  # N = 2 and r < 0.5: floor(N r) = 0 always
    lose = (torch.floor(r_v.double() * 16) >= 1).double().mean()  # (32 // 8) ** 2 patches
    assert mask["visual_masked_fraction"] == pytest.approx(float(lose))
    stdout = (av_run / "stdout.txt").read_text()
    assert "masking audio on 0% of training samples" in stdout


def test_arch_errors_name_the_config_key_not_a_flag(av_run: Path, tmp_path: Path) -> None:
    with pytest.raises(BnfixError) as info:
        build_encoder("visual", "no_such_module:factory", "scratch", (3, 32, 32))
    assert "model.visual_arch" in str(info.value) and "--arch" not in str(info.value)
    torch.save(tiny_cnn().state_dict(), tmp_path / "tiny.pt")
    with pytest.raises(BnfixError) as info:
        build_encoder("audio", "resnet18", tmp_path / "tiny.pt", (1, 64, 32))
    message = str(info.value)
    assert "model.audio_arch resnet18 does not fit" in message and "--arch" not in message
    # Through the CLI: one line, exit 2, nothing written.
    config = av_run / "fusion.toml"
    out = tmp_path / "never"
    result = run_inprocess(
        "fusion-tune", "--config", config, f"run.out_dir={out}", "model.audio_arch=nope_x:f"
    )
    assert result.code == 2
    assert "model.audio_arch nope_x:f" in result.stderr and "--arch" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["stage1.lr=0.5"], "stage1.lr"),
        (["run.seed=3", "stage1.epochs=5"], "stage1.epochs, run.seed"),
    ],
)
@pytest.mark.parametrize("force", [True, False])
def test_stage2_refuses_stage1_values_the_stage1_run_did_not_use(
    av_run: Path, overrides: list[str], named: str, force: bool
) -> None:
    out = av_run / "out"
    before = snapshot(out)
    flags = ["--force"] if force else []
    result = run_inprocess(
        "fusion-tune", "--config", av_run / "fusion.toml", "--stage", "2", *flags, *overrides
    )
    assert result.code == 2
    assert f"differs from the earlier run's ({named})" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert snapshot(out) == before  # config.toml above all


def test_stage2_with_other_settings_does_not_keep_results_it_would_misreport(
    av_run: Path, tmp_path: Path
) -> None:
    """``--stage 2 --compare none`` with another mask.rho left the default run's ``stage2/``
    in place, and config.toml, rewritten with the new rho, then vouched for it: summary.json
    reported its accuracy and mask fractions as this config's. It is refused, or removed
    (with its metrics lines) under --force; with unchanged settings, other arms' results stay."""
    out = tmp_path / "out"
    shutil.copytree(av_run / "out", out)
    before = snapshot(out)
    args = ("fusion-tune", "--config", av_run / "fusion.toml", "--stage", "2",
            f"run.out_dir={out}", "--compare", "none")  # fmt: skip
    result = run_inprocess(*args, "mask.rho=0.1")
    assert result.code == 2
    assert "stage2 was trained with other stage-2 settings than these (mask.rho)" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert snapshot(out) == before

    result = run_inprocess(*args, "mask.rho=0.1", "--force")
    assert result.code == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert "stage2" not in summary and "mask" not in summary
    assert set(summary["compare"]) == {"none"}
    assert not (out / "stage2").exists() and (out / "stage2-none" / "result.json").exists()
    phases = {r["phase"] for r in read_metrics(out)}
    assert "stage2" not in phases and "stage2-none" in phases
    assert load_config(out / "config.toml").mask.rho == pytest.approx((0.1, 0.1))

    # The same settings again, another arm: stage2-none was trained with them and stays.
    result = run_inprocess(*args[:-1], "ogm-ge", "mask.rho=0.1")
    assert result.code == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["compare"]) == {"ogm-ge"}
    assert (out / "stage2-none" / "result.json").exists()


def test_stage2_on_an_empty_out_dir_fails_before_features_or_writes(
    av_run: Path, tmp_path: Path
) -> None:
    out, cache = tmp_path / "empty", tmp_path / "cache"
    out.mkdir()
    result = run_inprocess(
        "fusion-tune", "--config", av_run / "fusion.toml", "--stage", "2",
        f"run.out_dir={out}", f"data.cache_dir={cache}",
    )  # fmt: skip
    assert result.code == 2
    assert "--stage 2 needs a finished stage 1 in run.out_dir" in result.stderr
    assert "stage1/confidence.json" in result.stderr and "config.toml" in result.stderr
    assert list(out.iterdir()) == [] and not cache.exists()  # no feature work, no file
    # So a later stage 1 finds the folder empty, as it was left: --resume there starts the run
    # (as after a kill during feature extraction); a folder with other files is refused.
    config = load_config(av_run / "fusion.toml", [f"run.out_dir={out}"])
    assert check_out_dir(config, ["stage1/audio"], "all", resume=True, force=False) is None
    (out / "notes.txt").write_text("mine")
    with pytest.raises(BnfixError, match="nothing to resume"):
        fusion_tune(config, resume=True)


# --------------------------------------------------------------------------------------------
# Resuming: an audio-only run stopped after its first epoch


@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> Path:
    """``stopped/``: a run stopped (as a kill would) after epoch 1 of 2; ``reference/``: the
    same run uninterrupted."""
    folder = tmp_path_factory.mktemp("resume")
    manifest = write_synthetic_av(
        folder / "data", classes=3, per_class=6, seed=1, modalities=("audio",), seconds=0.5
    )
    config = write_config(folder, manifest, epochs1=2, batch=4)
    env = {**os.environ, "COLUMNS": "200", STOP_AFTER_ENV: "1"}
    done = subprocess.run(
        [Path(sys.executable).with_name("bnfix"), "fusion-tune", "--config", config,
         "run.out_dir=stopped"],
        capture_output=True, text=True, cwd=folder, env=env, timeout=900,
    )  # fmt: skip
    assert done.returncode == STOPPED_EXIT, done.stderr
    fusion_tune(load_config(config, [f"run.out_dir={folder / 'reference'}"]), console=quiet())
    return folder


def resumable(stopped: Path, tmp_path: Path) -> Path:
    """A copy of the stopped run, free to be damaged."""
    return Path(shutil.copytree(stopped / "stopped", tmp_path / "run"))


def resume(stopped: Path, out: Path) -> str:
    """Resume in this process; returns what it printed."""
    console = quiet()
    fusion_tune(
        load_config(stopped / "fusion.toml", [f"run.out_dir={out}"]), resume=True, console=console
    )
    return console.export_text()


def test_a_partial_last_metrics_line_is_dropped_with_a_note(stopped: Path, tmp_path: Path) -> None:
    out = resumable(stopped, tmp_path)
    epoch2 = json.dumps(read_metrics(stopped / "reference")[1])
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write(epoch2[:57])  # killed in the middle of writing the next line
    printed = resume(stopped, out)
    assert "note: metrics.jsonl ended in a partial line (57 characters" in printed
    assert without_timing(read_metrics(out)) == without_timing(read_metrics(stopped / "reference"))


def test_damaged_metrics_elsewhere_than_the_last_line_is_one_clear_error(
    stopped: Path, tmp_path: Path
) -> None:
    out = resumable(stopped, tmp_path)
    good = (out / "metrics.jsonl").read_text()
    (out / "metrics.jsonl").write_text('{"phase": "stage1/au\n' + good)
    before = snapshot(out)
    result = run_inprocess(
        "fusion-tune", "--config", stopped / "fusion.toml", "--resume", f"run.out_dir={out}"
    )
    assert result.code == 2
    assert "metrics.jsonl: line 1 is not a metrics record" in result.stderr
    assert "damaged" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert snapshot(out) == before


def test_resume_under_another_number_of_processes_is_refused(stopped: Path, tmp_path: Path) -> None:
    out = resumable(stopped, tmp_path)
    saved = torch.load(out / "stage1" / "audio" / "last.pt", weights_only=True)
    assert saved["world"] == 1
    before = snapshot(out)
    torchrun = Path(sys.executable).with_name("torchrun")
    done = subprocess.run(
        [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "bnfix", "fusion-tune",
         "--config", stopped / "fusion.toml", "--resume", f"run.out_dir={out}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=900,
        env={**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode != 0
    assert "stage1/audio ran with 1 process, this resume with 2 processes" in done.stderr
    assert "resume it with 1 process (without torchrun)" in done.stderr
    assert done.stderr.count("bnfix: error:") == 1  # rank 0 says it; no traceback of ours
    assert "bnfix/fusion/" not in done.stderr
    assert snapshot(out) == before


CUDA_STATE = torch.tensor(  # a CUDA (Philox) generator's get_state(): seed and offset, 8 bytes each
    list((1234).to_bytes(8, "little")) + list((96).to_bytes(8, "little")), dtype=torch.uint8
)


@pytest.mark.parametrize("tagged", [False, True])
def test_resume_on_cpu_from_a_cuda_run_restores_what_applies(
    stopped: Path, tmp_path: Path, tagged: bool
) -> None:
    """The state a CUDA run saves: its augmentation generator lives on CUDA (16 bytes) and one
    CUDA device's global state sits next to the CPU ones (untagged: what older runs wrote)."""
    out = resumable(stopped, tmp_path)
    path = out / "stage1" / "audio" / "last.pt"
    saved = torch.load(path, weights_only=True)
    saved["rng"]["generator"] = CUDA_STATE.clone()
    saved["rng"]["cuda"] = [CUDA_STATE.clone()]
    if tagged:
        saved["rng"]["generator_device"] = "cuda"
    else:
        del saved["rng"]["generator_device"]
    torch.save(saved, path)
    printed = resume(stopped, out)
    assert "resuming stage1/audio after epoch 1" in printed
    assert "not restored: the CUDA generators of 1 device(s) (this run: 0 on cpu)" in printed
    assert "the augmentation/mask generator (cuda state, this run's is on cpu)" in printed
    assert without_timing(read_metrics(out)) == without_timing(read_metrics(stopped / "reference"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary == json.loads((stopped / "reference" / "summary.json").read_text())


def test_half_precision_inits_train_in_float32_with_a_note(stopped: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    torch.save(tiny_cnn().half().state_dict(), tmp_path / "fp16.pt")
    save_file(
        {k: v.to(torch.bfloat16) for k, v in tiny_cnn().state_dict().items()},
        str(tmp_path / "bf16.safetensors"),
    )
    for name, dtype in (("fp16.pt", "float16"), ("bf16.safetensors", "bfloat16")):
        console = quiet()
        overrides = [f"model.audio_init={tmp_path / name}", f"run.out_dir={tmp_path / name}.run"]
        overrides.append("stage1.epochs=1")
        fusion_tune(load_config(stopped / "fusion.toml", overrides), console=console)
        printed = console.export_text()
        assert f"weights stored as {dtype}, converted to float32 for training" in printed
        result = json.loads(
            (tmp_path / f"{name}.run" / "stage1" / "audio" / "result.json").read_text()
        )
        assert result["best_epoch"] == 1 and 0 <= result["test"] <= 1
    # The encoder holds the checkpoint's values, in float32, and trains.
    stored = torch.load(tmp_path / "fp16.pt", weights_only=True)
    encoder, info = build_encoder("audio", TINY, tmp_path / "fp16.pt", (1, 64, 32))
    assert {p.dtype for p in encoder.parameters()} == {torch.float32}
    assert torch.equal(encoder.backbone[3].weight, stored["3.weight"].float())
    assert torch.equal(encoder.backbone[0].weight, stored["0.weight"].float().sum(1, True))
    encoder(torch.randn(4, 1, 64, 32)).square().mean().backward()
    assert encoder.backbone[3].weight.grad.dtype == torch.float32
    assert info.dim == 64


def test_resume_refuses_a_manifest_whose_classes_changed(stopped: Path, tmp_path: Path) -> None:
    out = resumable(stopped, tmp_path)
    recorded = json.loads((out / "classes.json").read_text())
    assert recorded == {"labels": {"class0": 0, "class1": 1, "class2": 2}, "without_training": []}
    (out / "classes.json").write_text(json.dumps({"labels": {"class0": 0, "class3": 1}}))
    before = snapshot(out)
    with pytest.raises(BnfixError) as info:
        resume(stopped, out)
    assert "classes differ from the earlier run's (2 recorded, 3 now; label 'class3'" in str(
        info.value
    )
    assert snapshot(out) == before
