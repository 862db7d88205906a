"""fusion-tune comparisons: paired arms, seeds with intervals, OGM-GE, the stage-1 ensemble,
Shapley contributions and plots.

One small generated set (3 classes, 24 clips, tiny CNNs, 16x32 spectrograms, 24-pixel frames)
and one shared two-seed run with four arms keep the file fast on two CPU cores; the numbers
asserted are the runs' own or computed by hand here.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY, fusion_toml, run_inprocess
from rich.console import Console

from bnfix.architectures import build_model
from bnfix.checkpoint import load_checkpoint
from bnfix.errors import BnfixError
from bnfix.fusion import augment, balance
from bnfix.fusion.arms import parse_arms
from bnfix.fusion.command import _split_compare
from bnfix.fusion.config import BalanceConfig, load_config
from bnfix.fusion.run import STOP_AFTER_ENV, STOPPED_EXIT, fusion_tune
from bnfix.fusion.stats import interval, paired, shapley, t_quantile
from bnfix.fusion.synthetic import write_synthetic_av

TIMING = ("samples_per_s", "seconds")
ARM_KEYS = ("phase", "rule", "arm")
ARMS = "none,adaptive,ogm-ge,ensemble"
# Rule adaptive with rho = 0 masks nothing; alpha 4 is OGM-GE's strength.
CHANGES = {
    "data.visual": {"size": 24},
    "stage2": {"epochs": 2},
    "mask": {"tau": 0.0, "rho": 0.0, "audio_patch": [8, 4], "visual_patch": [6, 6]},
    "balance": {"alpha": 4.0},
    "run": {"seeds": [0, 1]},
}


def quiet() -> Console:
    return Console(record=True, width=220, file=open(os.devnull, "w"))


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def stripped(records: list[dict], drop: tuple[str, ...] = TIMING + ARM_KEYS) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in drop} for r in records]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """24 clips of 3 classes (12 train, 6 val, 6 test), the config and a feature cache.

    Audio dominates by construction: every tone is clear, while half of the frames carry
    only a faint tint of the class colour."""
    folder = tmp_path_factory.mktemp("data")
    write_synthetic_av(
        folder, classes=3, per_class=8, seed=0, seconds=0.4, image_size=28, frames=2,
        splits=("train", "train", "val", "test"), quiet_audio=0.0, vivid_visual=0.5,
    )  # fmt: skip
    config = folder / "fusion.toml"
    changes = {**CHANGES, "data": {"cache_dir": folder / "cache"}}
    config.write_text(fusion_toml(folder / "manifest.csv", changes))
    return folder


@pytest.fixture(scope="module")
def run(data: Path) -> Path:
    """Seeds 0 and 1, arms none, adaptive (rho = 0: masks nothing), ogm-ge and ensemble."""
    console = quiet()
    config = load_config(data / "fusion.toml", [f"run.out_dir={data / 'run'}"])
    fusion_tune(config, compare=ARMS, console=console)
    (data / "stdout.txt").write_text(console.export_text())
    return data / "run"


# --------------------------------------------------------------------------------------------
# Paired arms and seeds (the shared run)


def test_arms_that_train_identically_give_identical_numbers(run: Path) -> None:
    """mask.rho = 0: adaptive masks nothing, so it must train exactly as rule none."""
    for seed in (0, 1):
        out = run / f"seed-{seed}"
        records = read_metrics(out)
        arms = {a: [r for r in records if r.get("arm") == a] for a in ("none", "adaptive")}
        assert len(arms["none"]) == 2
        assert stripped(arms["none"]) == stripped(arms["adaptive"])
        compare = json.loads((out / "summary.json").read_text())["compare"]
        for key in ("test", "probe", "contribution"):
            assert compare["adaptive"][key] == compare["none"][key]
    pair = json.loads((run / "summary.json").read_text())["paired"]["adaptive-none"]
    assert set(pair) == {"fused", "audio", "visual", "probe_audio", "probe_visual"}
    for metric in pair.values():
        assert (metric["mean"], metric["wins"], metric["losses"]) == (0.0, 0, 0)


def test_seeds_run_in_their_folders_and_summarise_with_intervals(run: Path) -> None:
    summary = json.loads((run / "summary.json").read_text())
    assert summary["seeds"] == [0, 1]
    assert set(summary["runs"]) == {"0", "1"}
    for seed in (0, 1):
        own = json.loads((run / f"seed-{seed}" / "summary.json").read_text())
        assert summary["runs"][str(seed)] == own
        assert load_config(run / f"seed-{seed}" / "config.toml").run.seed == seed
    assert load_config(run / "config.toml").run.seeds == (0, 1)
    assert set(summary["runs"]["0"]["compare"]) == {"none", "adaptive", "ogm-ge", "ensemble"}
    # stats: the summary's tree, each number over seeds, Student-t with n - 1 = 1 df
    fused = [summary["runs"][s]["compare"]["ogm-ge"]["test"]["fused"] for s in ("0", "1")]
    stats = summary["stats"]["compare"]["ogm-ge"]["test"]["fused"]
    mean, std = np.mean(fused), np.std(fused, ddof=1)
    half = 12.706204736174707 * std / math.sqrt(2)
    assert stats["n"] == 2 and stats["mean"] == pytest.approx(mean, abs=1e-12)
    assert stats["std"] == pytest.approx(std, abs=1e-12)
    assert stats["ci95"] == pytest.approx([mean - half, mean + half], abs=1e-9)
    assert "rule" not in summary["stats"]["compare"]["none"]["mask"]  # strings are left out
    for key in ("stage1", "compare"):
        assert key in summary["stats"]
    # The terminal: mean ± half-width and the paired differences
    printed = (run.parent / "stdout.txt").read_text()
    assert "mean ± 95% interval over 2 seeds" in printed
    expected = f"{100 * mean:.1f} ± {100 * half:.1f}%" if std > 0 else f"{100 * mean:.1f} ± 0.0%"
    assert expected in printed
    assert "paired differences vs none" in printed and "ogm-ge-none" in printed


def test_killed_multi_seed_compare_resumes_to_the_uninterrupted_results(
    run: Path, data: Path, tmp_path: Path
) -> None:
    """Killed inside seed 1's second arm (seed 0 finished, as such a kill leaves it), then
    resumed: every seed's metrics and the top-level summary equal the uninterrupted run's."""
    out = tmp_path / "out"
    out.mkdir()
    shutil.copytree(run / "seed-0", out / "seed-0")
    shutil.copy(run / "config.toml", out / "config.toml")
    # Seed 1: 1 + 1 stage-1 epochs, 2 of none, then 1 of adaptive (the configured rule).
    env = {**os.environ, "COLUMNS": "200", STOP_AFTER_ENV: "5"}
    done = subprocess.run(
        [Path(sys.executable).with_name("bnfix"), "fusion-tune", "--config",
         data / "fusion.toml", "--compare", ARMS, "--resume", f"run.out_dir={out}"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == STOPPED_EXIT, done.stderr[-2000:]
    assert not (out / "summary.json").exists()
    assert [r["phase"] for r in read_metrics(out / "seed-1")][-1] == "stage2"
    console = quiet()
    config = load_config(data / "fusion.toml", [f"run.out_dir={out}"])
    fusion_tune(config, compare=ARMS, resume=True, console=console, plot=False)
    assert "resuming stage2 after epoch 1" in console.export_text()
    for seed in (0, 1):
        ours, theirs = out / f"seed-{seed}", run / f"seed-{seed}"
        assert stripped(read_metrics(ours), TIMING) == stripped(read_metrics(theirs), TIMING)
    assert json.loads((out / "summary.json").read_text()) == json.loads(
        (run / "summary.json").read_text()
    )


def test_a_seed_list_may_grow_on_resume_and_finished_seeds_are_kept(
    run: Path, data: Path, tmp_path: Path
) -> None:
    """A finished seed folder is reused as is (no epoch runs again); the summary follows
    the seed list given now. Only the stage-1 ensemble arm here, so nothing trains anew."""
    out = Path(shutil.copytree(run, tmp_path / "out"))
    before = snapshot(out / "seed-1")
    config = load_config(data / "fusion.toml", [f"run.out_dir={out}", "run.seeds=[1]"])
    summary = fusion_tune(config, compare=ARMS, resume=True, console=quiet(), plot=False)
    assert (
        summary["seeds"] == [1] and summary["stats"]["compare"]["none"]["test"]["fused"]["n"] == 1
    )
    assert summary["stats"]["compare"]["none"]["test"]["fused"]["ci95"] is None
    after = snapshot(out / "seed-1")
    assert {k: v for k, v in after.items() if k != "config.toml"} == {
        k: v for k, v in before.items() if k != "config.toml"
    }


# --------------------------------------------------------------------------------------------
# Shapley values, the ensemble


def test_shapley_values_sum_to_fused_minus_neither_every_epoch(run: Path) -> None:
    records = [r for r in read_metrics(run / "seed-0") if r["stage"] == 2]
    assert records
    for r in records:
        total = r["shapley_audio"] + r["shapley_visual"]
        assert total == pytest.approx(r["val_acc"] - r["val_acc_none"], abs=1e-12)
        # the exact two-player values from the four accuracies
        a, v, f, n = r["val_acc_audio"], r["val_acc_visual"], r["val_acc"], r["val_acc_none"]
        assert r["shapley_audio"] == pytest.approx(((a - n) + (f - v)) / 2, abs=1e-12)
        assert r["imbalance_ratio"] > 0
    contribution = json.loads((run / "seed-0" / "summary.json").read_text())["compare"]["none"][
        "contribution"
    ]
    assert set(contribution) == {"val", "test"}
    t = contribution["test"]
    assert set(t) == {"acc_none", "shapley_audio", "shapley_visual", "share_audio",
                      "imbalance_ratio"}  # fmt: skip
    assert shapley(0.9, 0.7, 0.4, 0.3) == pytest.approx(
        {"shapley_audio": 0.45, "shapley_visual": 0.15, "share_audio": 0.75}
    )


def test_seed_table_says_when_a_value_is_over_fewer_seeds_than_its_title() -> None:
    """audio's Shapley share is undefined on a seed where φa + φv = 0; the table titled
    "over 3 seeds" printed the one seed that had it as a bare 100.0%."""
    from bnfix.fusion.run import aggregate, print_seed_stats

    def arm(fused: float, audio: float, visual: float, none: float) -> dict:
        contribution = {"acc_none": none, **shapley(fused, audio, visual, none)}
        test = {"fused": fused, "audio": audio, "visual": visual}
        probe = {"audio": 1.0, "visual": 0.5}
        return {"test": test, "probe": probe, "contribution": {"test": contribution}}

    flat, audio_wins = (1 / 3, 1 / 3, 1 / 3, 1 / 3), (2 / 3, 2 / 3, 1 / 3, 1 / 3)
    runs = {seed: {"classes": {}, "compare": {"none": arm(*v), "adaptive": arm(*flat)}}
            for seed, v in enumerate((flat, audio_wins, flat))}  # fmt: skip
    summary = aggregate(runs, ["none", "adaptive"])
    share = summary["stats"]["compare"]["none"]["contribution"]["test"]["share_audio"]
    assert (share["mean"], share["n"]) == (1.0, 1)
    console = Console(width=160, record=True, file=io.StringIO())
    print_seed_stats(console, summary, ["none", "adaptive"])
    text = console.export_text()
    assert "over 3 seeds" in text
    row = next(line for line in text.splitlines() if "share" in line.lower())
    assert "100.0% (n=1 of 3)" in row and "n/a" in row  # adaptive: no seed has a share
    fused = next(line for line in text.splitlines() if line.startswith("│ fused"))
    assert "44.4 ± 47.8%" in fused and "33.3 ± 0.0%" in fused and "(n=" not in fused


def test_ogm_ge_lowers_the_dominant_modality_share_over_seeds(run: Path) -> None:
    """Audio dominates this set; OGM-GE damps the audio encoder's updates, so audio's share
    of the fused accuracy's Shapley value (test, pooled over seeds) falls below none's, and
    the imbalance ratio of the head's halves with it."""
    summary = json.loads((run / "summary.json").read_text())
    runs = [summary["runs"][s]["compare"] for s in ("0", "1")]

    def pooled(arm: str) -> float:
        phi_a = sum(r[arm]["contribution"]["test"]["shapley_audio"] for r in runs)
        phi_v = sum(r[arm]["contribution"]["test"]["shapley_visual"] for r in runs)
        return phi_a / (phi_a + phi_v)

    assert pooled("none") > 0.5  # audio dominates
    assert pooled("ogm-ge") < pooled("none")
    ratio = summary["stats"]["compare"]
    assert (
        ratio["ogm-ge"]["contribution"]["test"]["imbalance_ratio"]["mean"]
        < ratio["none"]["contribution"]["test"]["imbalance_ratio"]["mean"]
    )
    coeffs = [
        r["ogm_coeff_audio"] for r in read_metrics(run / "seed-0") if r.get("arm") == "ogm-ge"
    ]
    assert coeffs and all(0 < k < 1 for k in coeffs)  # audio was the modulated side


def test_ensemble_is_the_mean_of_the_stage1_probabilities(run: Path, data: Path) -> None:
    from bnfix.fusion.features import VisualOptions, load_features
    from bnfix.fusion.manifest import read_manifest
    from bnfix.probe_audio import AudioOptions

    out = run / "seed-1"
    norm = json.loads((out / "summary.json").read_text())["audio_normalisation"]
    audio = AudioOptions(num_mel_bins=16, target_frames=32, mean=norm["mean"], std=norm["std"])
    features = load_features(
        read_manifest(data / "manifest.csv"), audio, VisualOptions(frames=2, size=24),
        data / "cache", quiet(),
    )  # fmt: skip
    test = features.indices("test")
    models = {}
    for m in ("audio", "visual"):
        state = load_checkpoint(out / "stage1" / m / "best.safetensors").state_dict
        models[m] = build_model(state, TINY)[0].eval()
    with torch.no_grad():
        p_audio = models["audio"](features.audio[test]).softmax(1)
        frames = augment.visual_batch(features.visual[test], 24, train=False)
        logits = torch.stack([models["visual"](frames[:, t]) for t in range(2)]).mean(0)
        p_visual = logits.softmax(1)
    y = features.labels[test]
    expected = float(((p_audio + p_visual) / 2).argmax(1).eq(y).double().mean())
    ensemble = json.loads((out / "summary.json").read_text())["compare"]["ensemble"]
    assert ensemble["test"]["fused"] == pytest.approx(expected)
    own = {m: json.loads((out / "stage1" / m / "result.json").read_text())["test"]
           for m in ("audio", "visual")}  # fmt: skip
    assert ensemble["test"]["audio"] == own["audio"] and ensemble["test"]["visual"] == own["visual"]
    assert set(ensemble["probe"]) == {"audio", "visual"} and ensemble["mask"]["rule"] == "none"


# --------------------------------------------------------------------------------------------
# OGM-GE on a fixed batch


def _softmax_true(logits: list[list[float]], y: list[int]) -> float:
    total = 0.0
    for row, label in zip(logits, y, strict=True):
        exp = [math.exp(v) for v in row]
        total += exp[label] / sum(exp)
    return total


@pytest.mark.parametrize("dominant", ["audio", "visual"])
def test_ogm_coefficients_match_a_hand_computation(dominant: str) -> None:
    head = torch.nn.Linear(4, 3)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0, 0.2, 0], [0, 1.0, 0, 0.2], [0.5, 0.5, 0.1, 0.1]]))
        head.bias.copy_(torch.tensor([0.2, -0.4, 0.0]))
    strong, weak = torch.tensor([[3.0, 0.0], [0.0, 3.0]]), torch.tensor([[0.3, 0.1], [0.1, 0.2]])
    fa, fv = (strong, weak) if dominant == "audio" else (weak, strong)
    y = torch.tensor([0, 1])
    with torch.no_grad():
        la, lv = balance.half_logits(head, fa, fv)
        scores = balance.true_class_scores(la, lv, y)
    # by hand: each half's logits with half the bias
    w, b = head.weight.tolist(), [x / 2 for x in head.bias.tolist()]
    hand = []
    for feats, cols in ((fa.tolist(), (0, 1)), (fv.tolist(), (2, 3))):
        logits = [[sum(f[i] * w[c][col] for i, col in enumerate(cols)) + b[c] for c in range(3)]
                  for f in feats]  # fmt: skip
        hand.append(_softmax_true(logits, [0, 1]))
    assert scores.tolist() == pytest.approx(hand, rel=1e-6)
    alpha = 0.7
    k_a, k_v = balance.coefficients(scores, alpha)
    ratio = hand[0] / hand[1] if dominant == "audio" else hand[1] / hand[0]
    assert ratio > 1
    expected = 1 - math.tanh(alpha * (ratio - 1))
    strong_k, weak_k = (k_a, k_v) if dominant == "audio" else (k_v, k_a)
    assert float(strong_k) == pytest.approx(expected, rel=1e-6) and float(weak_k) == 1.0
    equal = balance.coefficients(torch.tensor([2.0, 2.0]), alpha)
    assert [float(k) for k in equal] == [1.0, 1.0]


def test_ogm_window_includes_both_edges() -> None:
    window = BalanceConfig(alpha=1.0, start_epoch=2, end_epoch=4)
    assert [window.active(e) for e in range(1, 6)] == [False, True, True, True, False]
    assert BalanceConfig(start_epoch=3).active(1000) and not BalanceConfig(start_epoch=3).active(2)
    with pytest.raises(BnfixError, match=r"balance.end_epoch \(1\) must be ≥"):
        load_config(_dummy_config(), ["balance.start_epoch=2", "balance.end_epoch=1"])


def _dummy_config(folder: Path = Path("/tmp")) -> Path:
    (folder / "bnfix-ogm-m.csv").write_text("id,audio,label,split\n")
    path = folder / "bnfix-ogm.toml"
    path.write_text(f'[data]\nmanifest = "{folder / "bnfix-ogm-m.csv"}"\n')
    return path


def test_ogm_noise_has_the_gradient_std_and_spares_the_weaker_encoder() -> None:
    torch.manual_seed(0)
    strong = [torch.nn.Parameter(torch.zeros(400, 500)), torch.nn.Parameter(torch.zeros(7))]
    weak = [torch.nn.Parameter(torch.zeros(300, 300)), torch.nn.Parameter(torch.zeros(1))]
    for p in (*strong, *weak):
        p.grad = torch.randn(p.shape) * 3 + 1
    before = [p.grad.clone() for p in (*strong, *weak)]
    gen = torch.Generator().manual_seed(5)
    k = torch.tensor(0.25)
    balance.modulate(strong, k, gen)
    balance.modulate(weak, torch.tensor(1.0), gen)
    noise = strong[0].grad - 0.25 * before[0]
    assert float(noise.mean()) == pytest.approx(0.0, abs=0.02)
    assert float(noise.std()) == pytest.approx(float(before[0].std()), rel=0.01)
    assert torch.equal(weak[0].grad, before[2]) and torch.equal(weak[1].grad, before[3])
    # every parameter of the dominant encoder, not only 4-D conv weights
    assert not torch.allclose(strong[1].grad, 0.25 * before[1])


# --------------------------------------------------------------------------------------------
# Statistics on fixed numbers


def test_t_quantiles_and_intervals_match_reference_values() -> None:
    table = {
        1: 12.706204736174707,
        2: 4.302652729749464,
        4: 2.7764451051977934,
        9: 2.2621571628540993,
        30: 2.0422724563012373,
    }  # fmt: skip  (scipy.stats.t.ppf)
    for df, q in table.items():
        assert t_quantile(0.975, df) == pytest.approx(q, rel=1e-10)
    try:
        from scipy import stats as scipy_stats
    except ImportError:
        scipy_stats = None
    if scipy_stats is not None:
        for df in (1, 3, 7, 20):
            assert t_quantile(0.975, df) == pytest.approx(scipy_stats.t.ppf(0.975, df), rel=1e-9)
    base = [0.50, 0.62, 0.58, 0.71, 0.55]
    arm = [0.56, 0.61, 0.66, 0.79, 0.55]
    runs = [{"none": {"test": {"fused": b}}, "x": {"test": {"fused": a}}}
            for a, b in zip(arm, base, strict=True)]  # fmt: skip
    got = paired(runs, ["none", "x"])["x-none"]["fused"]
    d = np.array(arm) - np.array(base)
    half = table[4] * d.std(ddof=1) / math.sqrt(len(d))
    assert got["mean"] == pytest.approx(d.mean(), abs=1e-12)
    assert got["ci95"] == pytest.approx([d.mean() - half, d.mean() + half], abs=1e-12)
    assert (got["wins"], got["losses"], got["n"]) == (3, 1, 5)
    assert interval([0.5]) == {"mean": 0.5, "std": None, "ci95": None, "n": 1}
    assert interval([None, 0.2, 0.4])["n"] == 2


# --------------------------------------------------------------------------------------------
# The command line


def test_compare_takes_a_list_and_a_bare_compare_keeps_its_meaning() -> None:
    assert _split_compare(["a.b=1"], None) == (["a.b=1"], False)
    assert _split_compare([], "mask.rho=0") == (["mask.rho=0"], True)  # bare + an override
    assert [a.name for a in parse_arms(True, "adaptive")] == ["none", "adaptive"]
    arms = parse_arms("none, OGM-GE+adaptive,ensemble,none+ogm-ge", "adaptive")
    assert [a.name for a in arms] == ["none", "adaptive+ogm-ge", "ensemble", "ogm-ge"]
    assert arms[1].rule == "adaptive" and arms[1].ogm and arms[3].rule == "none"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--compare", "none,ogmge"], "unknown arm 'ogmge'; did you mean ogm-ge?"),
        (["--compare", "adaptive+mean"], "combines at most one mask rule with ogm-ge"),
        (["--seeds", ""], "run.seeds must be a non-empty list"),
        (["run.seeds=[]"], "run.seeds must be a non-empty list"),
        (["--seeds", "0,a"], "--seeds: 'a' is not a seed"),
    ],
)
def test_bad_arms_and_seed_lists_are_one_line_and_write_nothing(
    data: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    out = tmp_path / "never"
    result = run_inprocess("fusion-tune", "--config", data / "fusion.toml", *args,
                           f"run.out_dir={out}")  # fmt: skip
    assert result.code == 2, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_ogm_ge_on_a_one_modality_manifest_is_refused(data: Path, tmp_path: Path) -> None:
    rows = (data / "manifest.csv").read_text().splitlines()
    header = rows[0].split(",")
    keep = [i for i, c in enumerate(header) if c != "frames"]
    lines = [",".join(r.split(",")[i] for i in keep) for r in rows]
    (data / "audio_only.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "never"
    manifest = data / "audio_only.csv"
    result = run_inprocess(
        "fusion-tune", "--config", data / "fusion.toml", "--compare", "ogm-ge",
        f"data.manifest={manifest}", f"run.out_dir={out}",
    )  # fmt: skip
    assert result.code == 2
    assert "--compare ogm-ge needs a manifest with both audio and visual" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()


def test_summary_plot_is_written_and_redrawn_by_plot_only(run: Path) -> None:
    pytest.importorskip("matplotlib")
    png = run / "summary.png"
    assert png.stat().st_size > 20_000
    png.unlink()
    result = run_inprocess("fusion-tune", "--plot-only", run)
    assert result.code == 0, result.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    missing = run_inprocess("fusion-tune", "--plot-only", run / "nothing-here")
    assert missing.code == 2 and "no such run folder" in missing.stderr
