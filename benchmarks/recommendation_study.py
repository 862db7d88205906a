"""Which advice should ``bnfix scan`` give: none, recalibrate, or repair? Measured, not assumed.

A small but real cross-modal task is built on the fly (nothing is downloaded): six classes of
generated 16 kHz sounds (steady harmonic hum, FM siren, rising chirps, falling chirps, periodic
hits, irregular noise texture), each clip with per-sample randomness (pitch, timing, level,
1-3 distractor events drawn from every class's vocabulary, a noise floor at 0-20 dB SNR),
featurised by bnfix's own audio front end (:func:`bnfix.probe_audio.features_with_length`:
Kaldi fbank, here 64 mel bins × 256 frames) and normalised with the training split's
statistics. A train/test split from disjoint random streams.

Cases (checkpoints, torchvision layout; the 1-channel stem is adapted by
:func:`bnfix.stem.adapt_stem`, RGB weights summed, as ``bnfix repair`` writes it):

- ``healthy``: the real ImageNet MobileNetV2 on disk (:func:`bnfix.default_checkpoint.fetch`);
- ``collapsed``: the same weights with planted mass collapse: 80% of the channels of the six
  BN layers that feed a ReLU6 in ``features.0``-``features.3`` set to the paper's dead state
  (γ = 1e-12, β = -1e-10: |γ|, |β| tiny, β negative, so the output is ≤ 0 for every input);
- ``random``: a random-init MobileNetV2 (one fixed init), as-is only: the floor pretraining
  must beat.

Arms per case: ``as-is``; ``recal`` (:func:`bnfix.recalibrate.recalibrate` on the training
features: AdaBN); ``abri`` (:func:`bnfix.abri.convert`, α = 0.5 per layer, learnable);
``abri+recal``. Each arm fine-tunes the whole model plus a fresh linear head with the same
hyper-parameters; for a given seed the head init, dropout and data order are the same in every
arm, so arm differences are paired. Also per (case, arm), without any training: a linear probe
on the frozen encoder in eval mode (global-pooled 1280-d features, L-BFGS logistic regression),
which is where running statistics matter most.

The scan numbers a recommendation could use are those ``bnfix scan --probe`` prints, computed
by the same code path (:func:`bnfix.scan_run.scan_one`) on the training features as probe:
per layer dead share, the stem BN's mean shift and log variance ratio, capacity used.

    python benchmarks/recommendation_study.py [--seeds 3] [--epochs 4] [--threads 2] [--quick]
        [--out benchmarks/recommendation_study.json] [--export-dir DIR]

``--export-dir`` also writes the collapsed checkpoint and the probe tensor, so that
``bnfix scan DIR/mobilenet_v2-collapsed.pt --modality audio --probe DIR/probe.pt`` can be
checked by hand.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from bnfix import __version__
from bnfix.abri import abri_blocks, convert
from bnfix.architectures import build_model
from bnfix.checkpoint import Checkpoint, load_checkpoint
from bnfix.default_checkpoint import fetch
from bnfix.probe import Probe, batches
from bnfix.probe_audio import AudioOptions, features_with_length, normalise
from bnfix.recalibrate import recalibrate
from bnfix.scan_run import ScanRequest, scan_one
from bnfix.stem import adapt_stem

SR = 16000
CLASSES = ("hum", "siren", "rise", "fall", "hits", "texture")
ARMS = ("as-is", "recal", "abri", "abri+recal")
#: BN layers that feed a ReLU6 in the first four MobileNetV2 stages (stem, depthwise, expand).
COLLAPSE_LAYERS = (
    "features.0.1",
    "features.1.conv.0.1",
    "features.2.conv.0.1",
    "features.2.conv.1.1",
    "features.3.conv.0.1",
    "features.3.conv.1.1",
)
DEAD_GAMMA, DEAD_BETA = 1e-12, -1e-10
#: layers counted as "early" in the summaries: the first stages, where the paper's collapse sits
EARLY_LAYERS = 9


# --- the synthetic audio task ----------------------------------------------------------------


def _env(rng: np.random.Generator, n: int, attack=(0.005, 0.05), decay=(0.3, 3.0)) -> np.ndarray:
    t = np.arange(n) / SR
    a, d = rng.uniform(*attack), rng.uniform(*decay)
    env = np.minimum(t / a, 1.0) * np.exp(-np.maximum(t - a, 0.0) / d)
    fade = min(n, int(0.01 * SR))
    env[n - fade :] *= np.linspace(1.0, 0.0, fade)
    return env


def _harmonics(rng: np.random.Generator, inst_freq: np.ndarray, most: int = 8) -> np.ndarray:
    phase = 2 * np.pi * np.cumsum(inst_freq) / SR
    rolloff = rng.uniform(0.8, 2.0)
    out = np.zeros_like(phase)
    for k in range(1, int(rng.integers(1, most + 1)) + 1):
        if k * inst_freq.max() >= 0.45 * SR:
            break
        out += k**-rolloff * np.sin(k * phase + rng.uniform(0, 2 * np.pi))
    return out


def _band_noise(rng: np.random.Generator, n: int, low: float, high: float) -> np.ndarray:
    size = 1 << max(n - 1, 1).bit_length()
    spec = np.fft.rfft(rng.standard_normal(size))
    freqs = np.fft.rfftfreq(size, 1.0 / SR)
    spec *= ((freqs >= low) & (freqs <= high)) / np.sqrt(np.maximum(freqs, 1.0))
    out = np.fft.irfft(spec, size)[:n]
    peak = np.abs(out).max()
    return out / peak if peak > 0 else out


def _event(label: int, rng: np.random.Generator, n: int) -> np.ndarray:
    """One sound event of class ``label``, ``n`` samples long."""
    t = np.arange(n) / SR
    if label == 0:  # hum: steady harmonic tone, barely any vibrato
        f0 = math.exp(rng.uniform(math.log(90), math.log(500)))
        inst = f0 * (1 + rng.uniform(0, 0.01) * np.sin(2 * np.pi * rng.uniform(3, 7) * t))
        return _harmonics(rng, inst) * _env(rng, n, decay=(1.0, 6.0))
    if label == 1:  # siren: slow, deep frequency modulation
        f0 = math.exp(rng.uniform(math.log(250), math.log(1200)))
        depth, rate = rng.uniform(0.08, 0.3), rng.uniform(0.6, 3.0)
        inst = f0 * (1 + depth * np.sin(2 * np.pi * rate * t + rng.uniform(0, 2 * np.pi)))
        return _harmonics(rng, inst, most=3) * _env(rng, n, decay=(1.0, 6.0))
    if label in (2, 3):  # rising / falling exponential sweeps, one to three of them
        out = np.zeros(n)
        for _ in range(int(rng.integers(1, 4))):
            length = int(rng.uniform(0.3, 1.2) * SR)
            start = int(rng.integers(0, max(n - length, 1)))
            length = min(length, n - start)
            lo = math.exp(rng.uniform(math.log(200), math.log(1500)))
            hi = lo * rng.uniform(2.0, 5.0)
            f_a, f_b = (lo, hi) if label == 2 else (hi, lo)
            tt = np.arange(length) / SR
            inst = f_a * (f_b / f_a) ** (tt / (length / SR))
            out[start : start + length] += _harmonics(rng, inst, most=2) * _env(
                rng, length, decay=(0.3, 2.0)
            )
        return out
    if label == 4:  # hits: a periodic train of short band-limited noise bursts
        out = np.zeros(n)
        period = rng.uniform(0.12, 0.45)
        centre = math.exp(rng.uniform(math.log(150), math.log(4000)))
        hit_len = int(rng.uniform(0.02, 0.07) * SR)
        decay = np.exp(-np.arange(hit_len) / (hit_len / 4))
        at = rng.uniform(0, period)
        while at < n / SR:
            s = int(at * SR)
            burst = _band_noise(rng, hit_len, centre / 2, centre * 2) * decay
            out[s : s + hit_len] += burst[: n - s] * rng.uniform(0.6, 1.0)
            at += period * rng.uniform(0.95, 1.05)
        return out
    # texture: band-limited noise with slow irregular amplitude modulation
    centre = math.exp(rng.uniform(math.log(300), math.log(5000)))
    width = rng.uniform(1.0, 3.0)
    noise = _band_noise(rng, n, centre * 2 ** (-width / 2), centre * 2 ** (width / 2))
    knots = rng.uniform(0.3, 1.0, size=int(rng.integers(3, 9)))
    am = np.interp(t, np.linspace(0, t[-1], knots.size), knots)
    return noise * am * _env(rng, n, decay=(2.0, 8.0))


def make_clip(label: int, rng: np.random.Generator, n: int) -> np.ndarray:
    """A clip of class ``label``: the class event, distractors, a noise floor, a random level."""
    main_len = int(rng.uniform(0.6, 1.0) * n)
    start = int(rng.integers(0, n - main_len + 1))
    clip = np.zeros(n)
    clip[start : start + main_len] += _event(label, rng, main_len)
    for _ in range(int(rng.integers(1, 4))):  # distractors from any class, shorter and softer
        d_len = int(rng.uniform(0.1, 0.3) * n)
        d_start = int(rng.integers(0, n - d_len + 1))
        d_gain = 10 ** (rng.uniform(-14, -4) / 20)
        other = int(rng.integers(len(CLASSES)))
        clip[d_start : d_start + d_len] += d_gain * _event(other, rng, d_len)
    rms = math.sqrt(float(np.mean(clip**2))) or 1.0
    snr_db = rng.uniform(0.0, 20.0)
    floor = _band_noise(rng, n, 40.0, 0.45 * SR)
    floor *= rms / (math.sqrt(float(np.mean(floor**2))) or 1.0) * 10 ** (-snr_db / 20)
    clip += floor
    return clip * (rng.uniform(0.1, 0.9) / np.abs(clip).max())


def make_task(train: int, test: int, frames: int, mels: int, seed: int) -> dict:
    """Balanced train/test clips from disjoint random streams, featurised and normalised."""
    opts = AudioOptions(sample_rate=SR, num_mel_bins=mels, target_frames=frames)
    n = opts.samples_needed
    out: dict = {}
    for split, count, stream in (("train", train, 0), ("test", test, 1)):
        labels = [i % len(CLASSES) for i in range(count)]
        feats = []
        for i, label in enumerate(labels):
            rng = np.random.default_rng([seed, stream, i])
            wave = torch.from_numpy(make_clip(label, rng, n).astype(np.float32))
            feats.append(features_with_length(wave, SR, opts)[0])
        out[split] = (torch.stack(feats), torch.tensor(labels))
    train_feats = out["train"][0].double()
    mean, std = float(train_feats.mean()), float(train_feats.std(correction=0))
    fixed = AudioOptions(SR, mels, frames, mean=mean, std=std)
    for split in ("train", "test"):
        feats, labels = out[split]
        out[split] = (normalise(feats, [frames] * len(feats), fixed).contiguous(), labels)
    out["norm"] = {"mean": mean, "std": std}
    return out


# --- checkpoints and models ------------------------------------------------------------------


def plant_collapse(state: dict, share: float, seed: int) -> dict[str, list[int]]:
    """Set ``share`` of the channels of COLLAPSE_LAYERS to the dead state, in place."""
    g = torch.Generator().manual_seed(seed)
    planted = {}
    for name in COLLAPSE_LAYERS:
        c = state[f"{name}.weight"].numel()
        idx = torch.randperm(c, generator=g)[: round(share * c)].sort().values
        state[f"{name}.weight"][idx] = DEAD_GAMMA
        state[f"{name}.bias"][idx] = DEAD_BETA
        planted[name] = idx.tolist()
    return planted


def make_cases(names: list[str], share: float) -> dict[str, dict]:
    path = fetch()
    source = load_checkpoint(path)
    cases: dict[str, dict] = {}
    for name in names:
        if name == "healthy":
            cases[name] = {
                "ckpt": source,
                "arms": ARMS,
                "note": f"real ImageNet weights {path.name}",
            }
        elif name == "collapsed":
            state = {k: v.clone() for k, v in source.state_dict.items()}
            planted = plant_collapse(state, share, seed=0)
            ckpt = Checkpoint(Path("mobilenet_v2-collapsed.pt"), state, "", "torch-zip")
            note = (
                f"{path.name} with {share:.0%} of {len(COLLAPSE_LAYERS)} early BN layers dead "
                f"(gamma={DEAD_GAMMA:g}, beta={DEAD_BETA:g})"
            )
            cases[name] = {"ckpt": ckpt, "arms": ARMS, "note": note, "planted": planted}
        elif name == "random":
            torch.manual_seed(0)
            state = torchvision.models.mobilenet_v2(weights=None).state_dict()
            ckpt = Checkpoint(Path("mobilenet_v2-random.pt"), state, "", "torch-zip")
            cases[name] = {"ckpt": ckpt, "arms": ("as-is",), "note": "random init (seed 0)"}
        else:
            raise SystemExit(f"unknown case {name!r} (healthy, collapsed, random)")
    return cases


def base_model(ckpt: Checkpoint, classes: int) -> nn.Module:
    """The checkpoint as a 1-channel audio encoder with a fresh linear head."""
    model, _ = build_model({k: v.clone() for k, v in ckpt.state_dict.items()})
    adapt_stem(model, 1)
    model.classifier[-1] = nn.Linear(model.classifier[-1].in_features, classes)
    return model


def prepare(model: nn.Module, arm: str, train_x: torch.Tensor, batch_size: int) -> nn.Module:
    model = copy.deepcopy(model)
    if arm.startswith("abri"):
        convert(model, alpha=0.5)
    if arm.endswith("recal"):
        recalibrate(model, batches(train_x, batch_size))
    return model.eval()


# --- scan numbers ----------------------------------------------------------------------------


def scan_numbers(ckpt: Checkpoint, probe_x: torch.Tensor, batch_size: int) -> dict:
    """What ``bnfix scan CKPT --modality audio --probe <train features>`` measures."""
    probe = Probe(probe_x, "audio", [f"train/{i}" for i in range(len(probe_x))], files=len(probe_x))
    request = ScanRequest([ckpt.path], modality="audio", batch_size=batch_size)
    report = scan_one(ckpt, probe, request)
    layers = []
    for layer in report.layers:
        dead = len(layer.dead or ())
        layers.append(
            {
                "name": layer.name,
                "channels": layer.channels,
                "abnormal": len(layer.abnormal),
                "always_dead": len(layer.always_dead),
                "dead": dead,
                "dead_share": dead / layer.channels,
                "mean_shift": layer.mean_shift,
                "log_var_ratio": layer.log_var_ratio,
            }
        )
    summary = report.summary
    early = layers[:EARLY_LAYERS]
    finite = [x for x in layers if x["log_var_ratio"] is not None]
    return {
        "layers": layers,
        "dead": summary.dead,
        "channels": summary.channels,
        "dead_share": summary.dead / summary.channels if summary.channels else 0.0,
        "capacity_used": summary.capacity_used,
        "abnormal": summary.abnormal,
        "always_dead": summary.always_dead,
        "worst_layer_dead_share": max(x["dead_share"] for x in layers),
        "worst_early_dead_share": max(x["dead_share"] for x in early),
        "layers_over_half_dead": sum(x["dead_share"] > 0.5 for x in layers),
        "stem_bn": layers[0]["name"],
        "stem_dead_share": layers[0]["dead_share"],
        "stem_mean_shift": layers[0]["mean_shift"],
        "stem_log_var_ratio": layers[0]["log_var_ratio"],
        "median_abs_log_var_ratio": statistics.median(abs(x["log_var_ratio"]) for x in finite),
        "notes": report.notes,
    }


# --- training and evaluation -----------------------------------------------------------------


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 64) -> float:
    model.eval()
    correct = sum(
        int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum())
        for i in range(0, len(x), batch)
    )
    return correct / len(x)


@torch.no_grad()
def pooled(model: nn.Module, x: torch.Tensor, batch: int = 64) -> torch.Tensor:
    model.eval()
    return torch.cat(
        [
            F.adaptive_avg_pool2d(model.features(x[i : i + batch]), 1).flatten(1)
            for i in range(0, len(x), batch)
        ]
    )


def linear_probe(model: nn.Module, task: dict, steps: int = 100, l2: float = 1e-3) -> float:
    """Frozen encoder in eval mode (running statistics in use) + logistic regression."""
    (xtr, ytr), (xte, yte) = task["train"], task["test"]
    ftr, fte = pooled(model, xtr).double(), pooled(model, xte).double()
    mu, sd = ftr.mean(0), ftr.std(0).clamp(min=1e-6)
    ftr, fte = (ftr - mu) / sd, (fte - mu) / sd
    w = torch.zeros(ftr.shape[1], len(CLASSES), dtype=torch.float64, requires_grad=True)
    b = torch.zeros(len(CLASSES), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(ftr @ w + b, ytr) + l2 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((fte @ w + b).argmax(1) == yte).double().mean())


def finetune(model: nn.Module, task: dict, seed: int, args: argparse.Namespace) -> dict:
    """Whole model + fresh head; a seed gives the same head, dropout and order in every arm."""
    (xtr, ytr), (xte, yte) = task["train"], task["test"]
    torch.manual_seed(seed)
    model.classifier[-1].reset_parameters()
    params = list(model.parameters())
    if args.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    per_epoch = len(xtr) // args.batch_size
    total = per_epoch * args.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )
    order = torch.Generator().manual_seed(seed)
    curve, losses = [], []
    start, cpu = time.perf_counter(), time.process_time()
    for epoch in range(1, args.epochs + 1):
        model.train()
        perm = torch.randperm(len(xtr), generator=order)
        running = 0.0
        for s in range(per_epoch):  # drop_last: every batch has batch_size samples
            idx = perm[s * args.batch_size : (s + 1) * args.batch_size]
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += float(loss.detach())
        losses.append(running / per_epoch)
        if epoch == 1 or epoch == args.epochs or args.eval_every:
            curve.append([epoch, accuracy(model, xte, yte)])
    alphas = [float(b.alpha.mean()) for b in abri_blocks(model).values()]
    # Diagnostic: the fine-tuned weights with running statistics re-estimated on the training
    # set (AdaBN after training). It separates what the weights learned from stale statistics,
    # i.e. what a long run (whose running statistics have converged) would show.
    recalibrate(model, batches(xtr, args.batch_size))
    return {
        "test_acc": curve[-1][1],
        "test_acc_adabn": accuracy(model, xte, yte),
        "curve": curve,
        "train_loss": losses,
        "alpha_mean": statistics.fmean(alphas) if alphas else None,
        "alpha_range": [min(alphas), max(alphas)] if alphas else None,
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu,
    }


# --- report ----------------------------------------------------------------------------------


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(runs: list[dict], cases: dict, key: str = "test_acc") -> list[dict]:
    rows = []
    for case, info in cases.items():
        base = {r["seed"]: r[key] for r in runs if r["case"] == case and r["arm"] == "as-is"}
        for arm in info["arms"]:
            got = {r["seed"]: r[key] for r in runs if r["case"] == case and r["arm"] == arm}
            if not got:
                continue
            m, s = mean_std(list(got.values()))
            diffs = [got[k] - base[k] for k in got if k in base]
            rows.append(
                {
                    "case": case,
                    "arm": arm,
                    "n": len(got),
                    "mean": m,
                    "std": s,
                    "diff_mean": statistics.fmean(diffs) if diffs else None,
                    "diff_min": min(diffs) if diffs else None,
                    "diff_max": max(diffs) if diffs else None,
                    "wins": sum(d > 0 for d in diffs),
                    "losses": sum(d < 0 for d in diffs),
                }
            )
    return rows


def print_table(rows: list[dict], probes: dict, title: str) -> None:
    print(f"\n{title}")
    head = (
        f"{'case':<10} {'arm':<11} {'n':>2} {'test acc %':>13}  "
        f"{'paired Δ vs as-is (pts)':>30}  {'lin.probe %':>11}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        acc = f"{100 * r['mean']:5.1f} ± {100 * r['std']:4.1f}"
        if r["arm"] == "as-is" or r["diff_mean"] is None:
            diff = "—"
        else:
            lo, hi = 100 * r["diff_min"], 100 * r["diff_max"]
            diff = (
                f"{100 * r['diff_mean']:+5.1f} [{lo:+5.1f}, {hi:+5.1f}] {r['wins']}W/{r['losses']}L"
            )
        lp = probes.get(f"{r['case']}/{r['arm']}")
        lp_s = f"{100 * lp:5.1f}" if lp is not None else "—"
        print(f"{r['case']:<10} {r['arm']:<11} {r['n']:>2} {acc:>13}  {diff:>30}  {lp_s:>11}")


def print_scan(case: str, s: dict) -> None:
    print(
        f"\nscan {case}: dead {s['dead']}/{s['channels']} ({100 * s['dead_share']:.2f}%), "
        f"capacity used {100 * s['capacity_used']:.1f}%, abnormal {s['abnormal']}, "
        f"always dead {s['always_dead']}, layers >50% dead {s['layers_over_half_dead']}"
    )
    print(
        f"  worst layer dead {100 * s['worst_layer_dead_share']:.1f}%, worst of first "
        f"{EARLY_LAYERS} {100 * s['worst_early_dead_share']:.1f}%; stem {s['stem_bn']}: dead "
        f"{100 * s['stem_dead_share']:.1f}%, mean shift {s['stem_mean_shift']:.2f}, "
        f"log var ratio {s['stem_log_var_ratio']:+.2f}; median |log var ratio| "
        f"{s['median_abs_log_var_ratio']:.2f}"
    )
    shown = [x for x in s["layers"][:EARLY_LAYERS]] + [
        x for x in s["layers"][EARLY_LAYERS:] if x["dead"]
    ]
    for x in shown:
        print(
            f"    {x['name']:<22} {x['dead']:>4}/{x['channels']:<4} dead "
            f"({100 * x['dead_share']:5.1f}%)  shift {x['mean_shift']:6.2f}  "
            f"lvr {x['log_var_ratio']:+6.2f}"
        )


# --- main ------------------------------------------------------------------------------------


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny smoke run (1 seed, 1 epoch)")
    p.add_argument("--train-clips", type=int, default=160)
    p.add_argument("--test-clips", type=int, default=120)
    p.add_argument("--frames", type=int, default=256)
    p.add_argument("--mels", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--collapse-share", type=float, default=0.8)
    p.add_argument("--cases", default="healthy,collapsed,random")
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--eval-every", action="store_true", help="test accuracy after every epoch")
    p.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"))
    p.add_argument("--export-dir", type=Path, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs = 1, 1
        args.train_clips, args.test_clips = 48, 24
    return args


def git_state() -> str:
    """The commit the code ran from, and whether the working tree differed from it."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "bnfix"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head}{' + uncommitted changes in bnfix/' if dirty else ''}"


def loadavg() -> list[float] | None:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    t0, cpu0 = time.perf_counter(), time.process_time()
    load_start, git = loadavg(), git_state()  # at start: the code this process imported
    task = make_task(args.train_clips, args.test_clips, args.frames, args.mels, args.data_seed)
    t_data = time.perf_counter() - t0
    xtr = task["train"][0]
    print(
        f"task: {len(CLASSES)} classes, {len(xtr)} train / {len(task['test'][0])} test clips, "
        f"input {list(xtr.shape[1:])}, built in {t_data:.1f}s; "
        f"{args.optimizer} lr {args.lr} bs {args.batch_size}, {args.epochs} epochs, "
        f"{args.seeds} seeds, {args.threads} threads; load average {load_start}",
        flush=True,
    )
    wanted_arms = [a for a in args.arms.split(",") if a]
    cases = make_cases([c for c in args.cases.split(",") if c], args.collapse_share)
    for info in cases.values():
        info["arms"] = tuple(a for a in info["arms"] if a in wanted_arms)
    if args.export_dir is not None:
        args.export_dir.mkdir(parents=True, exist_ok=True)
        torch.save(xtr, args.export_dir / "probe.pt")
        if "collapsed" in cases:
            state = cases["collapsed"]["ckpt"].state_dict
            torch.save(state, args.export_dir / "mobilenet_v2-collapsed.pt")
    scans: dict = {}
    probes: dict = {}
    runs: list[dict] = []
    command = " ".join(
        ["benchmarks/recommendation_study.py", *(sys.argv[1:] if argv is None else argv)]
    )

    def result(done: bool) -> dict:
        by = {
            "final": summarise(runs, cases),
            "epoch1": summarise([dict(r, test_acc=r["curve"][0][1]) for r in runs], cases),
            "adabn_after": summarise(runs, cases, key="test_acc_adabn"),
        }
        return {
            "schema": "bnfix.recommendation_study/1",
            "complete": done,
            "bnfix_version": __version__,
            "git": git,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "command": command,
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "task": {
                "classes": CLASSES,
                "train": len(xtr),
                "test": len(task["test"][0]),
                "input": list(xtr.shape[1:]),
                "normalisation": task["norm"],
            },
            "cases": {
                c: {"note": i["note"], "arms": list(i["arms"]), "planted": i.get("planted")}
                for c, i in cases.items()
            },
            "scan": scans,
            "linear_probe": probes,
            "summary": by,
            "runs": runs,
            "seconds": {
                "total": time.perf_counter() - t0,
                "cpu": time.process_time() - cpu0,
                "data": t_data,
            },
            "loadavg": {"start": load_start, "end": loadavg()},
        }

    def save(done: bool) -> dict:
        out = result(done)
        args.out.write_text(json.dumps(out, indent=1) + "\n")  # after every run: partial, too
        return out

    for case, info in cases.items():
        t = time.perf_counter()
        scans[case] = scan_numbers(info["ckpt"], xtr, args.batch_size)
        print_scan(case, scans[case])
        print(f"  (scan {time.perf_counter() - t:.1f}s)", flush=True)
        model = base_model(info["ckpt"], len(CLASSES))
        for arm in info["arms"]:
            prepared = prepare(model, arm, xtr, args.batch_size)
            probes[f"{case}/{arm}"] = linear_probe(prepared, task)
            for seed in range(args.seeds):
                run = finetune(copy.deepcopy(prepared), task, seed, args)
                runs.append({"case": case, "arm": arm, "seed": seed, **run})
                curve = " ".join(f"e{e}:{100 * a:.1f}" for e, a in run["curve"])
                alpha = "" if run["alpha_mean"] is None else f"; α {run['alpha_mean']:.2f}"
                print(
                    f"  {case:<9} {arm:<10} seed {seed}: test {100 * run['test_acc']:5.1f}% "
                    f"({curve}; AdaBN after {100 * run['test_acc_adabn']:.1f}; loss "
                    f"{run['train_loss'][-1]:.3f}{alpha}; {run['seconds']:.0f}s) "
                    f"[lin.probe {100 * probes[f'{case}/{arm}']:.1f}%] "
                    f"t={time.perf_counter() - t0:.0f}s",
                    flush=True,
                )
                save(False)
    out = save(True)
    print_table(
        out["summary"]["final"],
        probes,
        f"test accuracy after {args.epochs} epochs, as trained (mean ± std over seeds; "
        "Δ paired by seed; lin.probe: frozen encoder, no training)",
    )
    if args.epochs > 1:
        print_table(out["summary"]["epoch1"], probes, "test accuracy after epoch 1")
    print_table(
        out["summary"]["adabn_after"],
        probes,
        "test accuracy of the fine-tuned weights after AdaBN on the training set (diagnostic: "
        "stale running statistics removed)",
    )
    for case in cases:
        print_scan(case, scans[case])
    wall = out["seconds"]["total"]
    print(
        f"\ntotal {wall:.0f}s ({wall / 60:.1f} min), process CPU {out['seconds']['cpu']:.0f}s, "
        f"load average {load_start} -> {out['loadavg']['end']}"
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
