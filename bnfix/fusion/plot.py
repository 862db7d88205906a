"""summary.png of a fusion-tune run (matplotlib, the ``plot`` extra).

Top row: validation accuracy per stage-2 epoch (fused, audio-only, visual-only readouts of the
fusion head), one line per arm: the mean over seeds, with a band from the lowest to the
highest seed. Bottom: test accuracy and linear probes per arm, bars at the mean over seeds
with 95% Student-t intervals as error bars (single-seed runs: the values, no bars of error).
Everything is read back from the run folder, so ``--plot-only`` redraws a finished run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from bnfix.errors import BnfixError

__all__ = ["plot_run"]

READOUTS = (
    ("val_acc", "fused"),
    ("val_acc_audio", "audio-only (fusion head)"),
    ("val_acc_visual", "visual-only (fusion head)"),
)
BARS = (
    ("fused", ("test", "fused")),
    ("audio-only", ("test", "audio")),
    ("visual-only", ("test", "visual")),
    ("probe audio", ("probe", "audio")),
    ("probe visual", ("probe", "visual")),
)


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BnfixError(f"cannot read: {exc}", path) from None


def _records(folder: Path) -> list[dict[str, Any]]:
    path = folder / "metrics.jsonl"
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    out = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a partial last line of a stopped run
        if isinstance(record, dict):
            out.append(record)
    return out


def _dig(tree: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(tree, dict):
            return None
        tree = tree.get(key)
    return tree


def plot_run(out: str | Path) -> Path:
    """Draw ``out/summary.png`` from a run folder (one seed or several); returns its path."""
    out = Path(out)
    summary_path = out / "summary.json"
    if not summary_path.exists():
        raise BnfixError("no summary.json here: --plot-only needs a finished run folder", out)
    summary = _read(summary_path)
    multi = "seeds" in summary
    folders = [out / f"seed-{s}" for s in summary["seeds"]] if multi else [out]
    seeds = [str(s) for s in summary["seeds"]] if multi else [None]

    # Per-epoch curves: arm -> readout -> epoch -> [value per seed]
    curves: dict[str, dict[str, dict[int, list[float]]]] = {}
    for folder in folders:
        for r in _records(folder):
            if r.get("stage") != 2:
                continue
            arm = r.get("arm") or r.get("rule") or "stage2"
            for key, _ in READOUTS:
                if r.get(key) is not None:
                    curves.setdefault(arm, {}).setdefault(key, {}).setdefault(
                        r["epoch"], []
                    ).append(r[key])

    # Bars: arm -> metric -> (mean, lo, hi)
    if multi:
        compare = _dig(summary, ("stats", "compare")) or {}
        if not compare and _dig(summary, ("stats", "stage2")):
            rule = _dig(summary, ("runs", seeds[0], "mask", "rule")) or "stage2"
            compare = {rule: summary["stats"]["stage2"]}
    else:
        compare = summary.get("compare") or {}
        if not compare and "stage2" in summary:
            compare = {summary.get("mask", {}).get("rule", "stage2"): summary["stage2"]}
    arms = list(dict.fromkeys([*compare, *curves]))
    colours = {arm: plt.get_cmap("tab10")(i % 10) for i, arm in enumerate(arms)}
    # Arms that train alike draw the same line: markers and dashes keep each one visible.
    markers = {arm: "osD^vP*X"[i % 8] for i, arm in enumerate(arms)}
    dashes = {arm: ("-", "--", ":", "-.")[i % 4] for i, arm in enumerate(arms)}
    n_seeds = len(folders)
    labels = _dig(summary, ("classes", "labels")) or {}
    chance = 100 / len(labels) if labels else None

    fig = plt.figure(figsize=(14, 8.5), layout="constrained")
    grid = fig.add_gridspec(2, 3, height_ratios=[1, 1.1])
    title = out.name or str(out)
    where = f"{n_seeds} seeds ({', '.join(seeds)})" if multi else "one seed"
    band = "; curves: mean over seeds, band: lowest to highest seed" if n_seeds > 1 else ""
    fig.suptitle(f"fusion-tune {title}: {where}{band}", fontsize=12)
    shared = None
    for i, (key, label) in enumerate(READOUTS):
        ax = fig.add_subplot(grid[0, i], sharey=shared)
        shared = shared or ax
        for arm in arms:
            series = curves.get(arm, {}).get(key)
            if not series:
                continue
            epochs = sorted(series)
            values = [series[e] for e in epochs]
            mean = [100 * sum(v) / len(v) for v in values]
            ax.plot(epochs, mean, marker=markers[arm], ms=5, ls=dashes[arm], lw=1.6,
                    color=colours[arm], label=arm, mfc="none")  # fmt: skip
            if n_seeds > 1:
                low = [100 * min(v) for v in values]
                high = [100 * max(v) for v in values]
                ax.fill_between(epochs, low, high, color=colours[arm], alpha=0.18, lw=0)
        if chance is not None:
            ax.axhline(chance, color="grey", ls=":", lw=1)
            ax.annotate("chance", (0.01, chance), xycoords=("axes fraction", "data"),
                        fontsize=7, color="grey", va="bottom")  # fmt: skip
        ax.set_title(f"val accuracy, {label}", fontsize=10)
        ax.set_xlabel("stage-2 epoch")
        if i == 0:
            ax.set_ylabel("validation accuracy (%)")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    if not curves:
        shared.text(0.5, 0.5, "no stage-2 epochs in this run", ha="center", va="center",
                    transform=shared.transAxes)  # fmt: skip

    ax = fig.add_subplot(grid[1, :])
    width = 0.8 / max(len(arms), 1)
    for j, arm in enumerate(compare):
        xs, heights, errors = [], [], [[], []]
        for k, (_, path) in enumerate(BARS):
            value = _dig(compare[arm], path)
            mean = value.get("mean") if isinstance(value, dict) else value
            if mean is None:
                continue
            xs.append(k + (j - (len(compare) - 1) / 2) * width)
            heights.append(100 * mean)
            ci = value.get("ci95") if isinstance(value, dict) else None
            # Accuracy lies in [0, 1]: the interval is drawn clipped to it.
            errors[0].append(100 * (mean - max(ci[0], 0.0)) if ci else 0.0)
            errors[1].append(100 * (min(ci[1], 1.0) - mean) if ci else 0.0)
        yerr = errors if multi and any(e > 0 for e in errors[0] + errors[1]) else None
        bars = ax.bar(xs, heights, width * 0.95, color=colours[arm], label=arm, yerr=yerr,
                      capsize=3, error_kw={"elinewidth": 1, "alpha": 0.8})  # fmt: skip
        ax.bar_label(bars, fmt="%.0f", fontsize=7, label_type="center", color="white")
    ax.set_xticks(range(len(BARS)), [name for name, _ in BARS])
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 105)
    detail = (
        "bars: mean over seeds, error bars: 95% Student-t interval, clipped to 0–100"
        if multi
        else "one seed"
    )
    if chance is not None:
        ax.axhline(chance, color="grey", ls=":", lw=1)
        ax.annotate("chance", (0.002, chance), xycoords=("axes fraction", "data"), fontsize=7,
                    color="grey", va="bottom")  # fmt: skip
    note = "; ensemble: audio-/visual-only are the stage-1 models" if "ensemble" in compare else ""
    ax.set_title(f"test accuracy and linear probes per arm ({detail}{note})", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    if arms:  # one legend for the whole figure, outside the data
        handles = [
            plt.Line2D(
                [],
                [],
                color=colours[a],
                marker=markers[a],
                ls=dashes[a],
                mfc="none",
                lw=1.6,
                label=a if a in curves else f"{a} (no stage 2)",
            )
            for a in arms
        ]
        fig.legend(handles=handles, loc="outside right upper", fontsize=9, title="arm")
    path = out / "summary.png"
    tmp = out / ".summary.png.tmp"
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    tmp.replace(path)
    return path
