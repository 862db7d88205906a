"""Fusion-tune on a CUDA GPU, measured once: stage-2 speed in bf16 vs fp32, and the data share.

Meant for one run on a lent GPU machine (H100/H200), about 2 minutes, no network:

1. writes a generated audio-visual set (``write_synthetic_av``: 8 classes x 128 clips of 5.12 s,
   3 PNG frames of 128 px each) and the demo config with real-sized inputs (audio 512 frames x
   128 mel bins, visual 3 frames at 112 px, batch 32, ResNet-18 on both sides, the library's
   default mask patches), runs stage 1 once (1 epoch per modality, bf16) and then stage 2 (2
   epochs) twice, each from a copy of that same stage 1, through ``fusion_tune``:
   (a) ``run.amp=true`` (bf16 autocast), (b) ``run.amp=false`` (fp32). On CUDA the stage code
   always converts the model to channels_last (``stages._prepare``, not configurable), so both
   variants are channels_last; the timing below adds a contiguous-format step for contrast;
2. per variant: stage-2 training samples/s per epoch (metrics.jsonl), the test accuracies
   (summary.json), and the share of a training step spent in the data path: the stage's own
   loader (same ``EpochBatches``, reading the memory-mapped feature stores, pinned, workers as
   configured) + ``_inputs`` (to the device,
   crop/flip/normalise) + ``mask_patches`` with the run's ratios, timed alone against the full
   step (the same data path + bf16/fp32 forward, loss, backward, SGD step) and against the step
   on one fixed batch (compute alone); every iteration ends with a device synchronise. The
   data path is also timed with every sample masked at ratio ``mask.rho`` (after one stage-1
   epoch the adaptive rule may mask little or nothing).

The per-step loop of ``stages._train_epoch_fusion`` is inline, so the data path is rebuilt here
from the same helpers (``stages._loader``, ``stages._inputs``, ``masking.mask_patches``, in the
same order); the model and optimizer come from ``stages._build_fusion``/``_prepare`` and
``make_optimizer``, reading the variant's stage-1 checkpoints.

Results go to ``$OUT/gpu_fusion.json`` when OUT is set. Without CUDA the script says so and
exits with status 2 (writing a JSON that says it was skipped); status 1 means a variant failed
to run. ``--cpu-dry-run`` runs the same flow tiny on the CPU, to try the script without a GPU.

    python benchmarks/gpu_fusion_check.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bnfix need not be installed
from bnfix.fusion.config import FusionConfig, load_config
from bnfix.fusion.run import fusion_tune
from bnfix.fusion.synthetic import write_demo_config, write_synthetic_av

SIZES: dict[str, dict[str, Any]] = {
    "gpu": {
        "data": {"classes": 8, "per_class": 128, "seconds": 5.12, "image_size": 128, "frames": 3},
        "overrides": [
            "data.audio.target_frames=512", "data.audio.mel_bins=128",
            "data.visual.size=112", "data.visual.frames=3",
            "stage1.epochs=1", "stage1.batch_size=32", "stage2.epochs=2", "stage2.batch_size=32",
            "mask.audio_patch=[32, 8]", "mask.visual_patch=[10, 10]",
            "run.device=cuda",  # run.workers: the default on CUDA (DataLoader workers)
        ],
        "iters": 150, "warmup": 10,
    },
    "dry": {
        "data": {"classes": 3, "per_class": 10, "seconds": 0.32, "image_size": 18, "frames": 2},
        "overrides": [
            "data.audio.target_frames=32", "data.audio.mel_bins=16",
            "data.visual.size=16", "data.visual.frames=2",
            "stage1.epochs=1", "stage1.batch_size=8", "stage2.epochs=2", "stage2.batch_size=8",
            "mask.audio_patch=[8, 4]", "mask.visual_patch=[4, 4]",
            "run.device=cpu", "run.workers=0",
        ],
        "iters": 3, "warmup": 1,
    },
}  # fmt: skip
#: Stage 2 variants, each from the same stage 1 (which runs with run.amp=true).
VARIANTS = {
    "bf16 autocast, channels_last": ["run.amp=true"],
    "fp32, channels_last": ["run.amp=false"],
}


# --------------------------------------------------------------------------------------------
# The data path and the step, as stages._train_epoch_fusion runs them


def measure(config: FusionConfig, iters: int, warmup: int) -> dict[str, Any]:
    """Time the stage-2 data path alone, the full step, and the step on one fixed batch."""
    from bnfix.fusion import masking, stages
    from bnfix.fusion.distributed import EpochBatches, setup
    from bnfix.fusion.features import load_features
    from bnfix.fusion.manifest import read_manifest
    from bnfix.fusion.model import Encoder
    from bnfix.fusion.run import RunDir, feature_options

    quiet = Console(quiet=True)
    audio, visual = feature_options(config)
    features = load_features(  # the stores are warm: the run just filled them
        read_manifest(config.manifest), audio, visual, config.data.cache_dir, quiet
    )
    d = setup(config.run.device)
    rd = RunDir(config.run.out_dir, d, config.run.seed, quiet)
    ctx = stages.Context(config, features, d, quiet, rd)
    cuda = ctx.cuda
    cfg, m = config.stage2, config.mask
    ratio_a, ratio_v, mask_stats = stages.mask_ratios(ctx, m.rule)
    real = None if m.rule == "none" else (ratio_a, ratio_v)
    n = len(features.labels)
    forced = (torch.full((n,), m.rho[0]), torch.full((n,), m.rho[1]))
    model = stages._prepare(ctx, stages._build_fusion(ctx))
    optimizer = stages.make_optimizer(model.parameters(), cfg)
    model.train()
    batches = EpochBatches(ctx.positions["train"], cfg.batch_size, rd.phase_seed("stage2"), d)
    loader = stages._loader(ctx, batches, ("audio", "visual"))
    gen = rd.seed_epoch("stage2", 0, ctx.device)

    def forever() -> Iterator[dict[str, torch.Tensor]]:
        epoch = 0
        while True:
            batches.set_epoch(epoch)
            yield from loader
            epoch += 1

    stream = forever()

    def data_path(ratios: tuple[torch.Tensor, torch.Tensor] | None) -> tuple:
        batch = next(stream)
        x_a = stages._inputs(ctx, batch, "audio", True, gen)
        x_v = stages._inputs(ctx, batch, "visual", True, gen)
        if ratios is not None:
            index = batch["index"]
            r_a = ratios[0][index].to(ctx.device, non_blocking=True)
            r_v = ratios[1][index].to(ctx.device, non_blocking=True)
            x_a = masking.mask_patches(x_a, r_a, m.audio_patch, gen)
            x_v = masking.mask_patches(x_v, r_v, m.visual_patch, gen)
        y = batch["label"].to(ctx.device, non_blocking=True)
        return x_a, x_v, y

    def step(x_a: torch.Tensor, x_v: torch.Tensor, y: torch.Tensor) -> None:
        with ctx.autocast():
            logits, _, _ = model(x_a, x_v)
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def timed(fn: Callable[[], object]) -> dict[str, float]:
        for _ in range(warmup):
            fn()
        if cuda:
            torch.cuda.synchronize()
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return {
            "mean_ms": 1e3 * statistics.fmean(times),
            "median_ms": 1e3 * statistics.median(times),
            "iters": iters,
        }

    fixed = data_path(real)
    result: dict[str, Any] = {
        "mask": mask_stats,
        "batch_size": cfg.batch_size,
        "train_samples": len(ctx.positions["train"]),
        "batches_per_epoch": len(batches),
        "iters": iters,
        "warmup": warmup,
        "data_path": timed(lambda: data_path(real)),
        "data_path_all_masked": timed(lambda: data_path(forced)),
        "full_step": timed(lambda: step(*data_path(real))),
        "compute_step": timed(lambda: step(*fixed)),
    }
    if cuda:  # what channels_last buys: the same step with the model left contiguous
        model.to(memory_format=torch.contiguous_format)
        for module in model.modules():
            if isinstance(module, Encoder):
                module.channels_last = False
        result["full_step_contiguous"] = timed(lambda: step(*data_path(real)))
    full = result["full_step"]["mean_ms"]
    result["data_share"] = result["data_path"]["mean_ms"] / full
    result["data_share_all_masked"] = result["data_path_all_masked"]["mean_ms"] / full
    # Mean batch size over the cycle (the last batch of an epoch is short).
    result["step_samples_per_s"] = len(batches.sampler) / len(batches) / (full / 1e3)
    return result


# --------------------------------------------------------------------------------------------
# The runs


def stage2_metrics(out: Path) -> list[dict[str, Any]]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("phase") == "stage2"]


def run_variant(
    name: str, cfg_path: Path, base: list[str], extra: list[str], stage1: Path, size: dict,
    console: Console,
) -> dict[str, Any]:  # fmt: skip
    """Stage 2 from a copy of the shared stage 1, then the step timing."""
    slug = name.split(",")[0].replace(" ", "-")
    out = stage1.parent / f"stage2-{slug}"
    shutil.copytree(stage1, out)
    # The copied config.toml names the stage-1 folder as run.out_dir: point it at the copy
    # (--stage 2 needs the file, and run.out_dir may differ from it anyway).
    saved = out / "config.toml"
    saved.write_text(saved.read_text().replace(stage1.as_posix(), out.as_posix()))
    config = load_config(cfg_path, [*base, *extra, f"run.out_dir={out.as_posix()}"])
    cuda = config.run.device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    console.rule(f"stage 2: {name}")
    start = time.perf_counter()
    summary = fusion_tune(config, stage="2", console=console)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    epochs = stage2_metrics(out)
    timing = measure(config, size["iters"], size["warmup"])
    if cuda:
        torch.cuda.empty_cache()
    return {
        "variant": name,
        "overrides": extra,
        "stage2_seconds": seconds,
        "samples_per_s": [r["samples_per_s"] for r in epochs],
        "epoch_seconds": [r["seconds"] for r in epochs],
        "train_loss": [r["train_loss"] for r in epochs],
        "peak_gib": peak,
        "test": summary["stage2"]["test"],
        "probe": summary["stage2"]["probe"],
        "val": summary["stage2"]["val"],
        "timing": timing,
    }


def print_table(results: list[dict[str, Any]]) -> None:
    ok = [r for r in results if "error" not in r]
    if not ok:
        return
    t = "timing"
    rows: list[tuple[str, Callable[[dict], str]]] = [
        ("stage 2 samples/s per epoch", lambda r: _join("{:.0f}", r["samples_per_s"])),
        ("timed step: samples/s", lambda r: f"{r[t]['step_samples_per_s']:.0f}"),
        ("full step, mean (median) ms", lambda r: _ms(r[t]["full_step"])),
        ("compute only (fixed batch) ms", lambda r: _ms(r[t]["compute_step"])),
        ("data path ms (real ratios)", lambda r: _ms(r[t]["data_path"])),
        ("data path ms (all masked)", lambda r: _ms(r[t]["data_path_all_masked"])),
        ("data share of step", lambda r: f"{r[t]['data_share']:.1%}"),
        ("data share, all masked", lambda r: f"{r[t]['data_share_all_masked']:.1%}"),
        ("full step, contiguous ms", lambda r: _ms(r[t].get("full_step_contiguous"))),
        ("samples masked (a / v)", lambda r: _join("{:.0%}", [
            r[t]["mask"]["audio_masked_fraction"], r[t]["mask"]["visual_masked_fraction"]])),
        ("test fused / audio / visual", lambda r: _join("{:.1%}", [
            r["test"][k] for k in ("fused", "audio", "visual")])),
        ("linear probe audio / visual", lambda r: _join("{:.1%}", [
            r["probe"][k] for k in ("audio", "visual")])),
        ("peak GPU memory GiB", lambda r: _join("{:.2f}", [r["peak_gib"]])),
    ]  # fmt: skip
    width = max(len(r["variant"]) for r in ok) + 2
    print()
    print(f"{'':32s}" + "".join(f"{r['variant']:>{width}s}" for r in ok))
    for label, get in rows:
        print(f"{label:32s}" + "".join(f"{get(r):>{width}s}" for r in ok))


def _join(fmt: str, values: list[float | None]) -> str:
    return " / ".join("n/a" if v is None else fmt.format(v) for v in values)


def _ms(t: dict[str, float] | None) -> str:
    return "n/a" if t is None else f"{t['mean_ms']:.1f} ({t['median_ms']:.1f})"


def machine_line(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        cuda = f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
    else:
        name, cuda = platform.processor() or platform.machine(), "no CUDA"
    return (
        f"{name}; torch {torch.__version__}, {cuda}; python {platform.python_version()}; "
        f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads"
    )


def write(result: dict) -> None:
    out = os.environ.get("OUT")
    if out:
        path = Path(out) / "gpu_fusion.json"
        path.write_text(json.dumps(result, indent=2))
        print(f"\nwrote {path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cpu-dry-run", action="store_true", help="run tiny on the CPU, to try the script"
    )
    args = parser.parse_args()
    start = time.perf_counter()
    if args.cpu_dry_run:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        message = (
            "gpu_fusion_check: CUDA is not available here (torch.cuda.is_available() is False), "
            "so there is nothing to measure; run it on a CUDA machine, or pass --cpu-dry-run"
        )
        print(message, file=sys.stderr)
        write({"skipped": message, "torch": torch.__version__})
        return 2
    try:
        import soundfile  # noqa: F401  (the synthetic set and the features need it)
    except ImportError as exc:
        message = (
            f"gpu_fusion_check: cannot import soundfile ({exc}); carry its wheels (soundfile, "
            "cffi, pycparser) as the device README says"
        )
        print(message, file=sys.stderr)
        write({"error": message, "torch": torch.__version__})
        return 1
    size = SIZES["dry" if args.cpu_dry_run else "gpu"]
    machine = machine_line(device)
    print(machine)
    flags = {  # left as the library leaves them: it sets none of these
        "cudnn.benchmark": torch.backends.cudnn.benchmark,
        "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
        "cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
    }
    print("backend flags: " + ", ".join(f"{k}={v}" for k, v in flags.items()))
    console = Console(highlight=False, width=110)
    result: dict[str, Any] = {
        "machine": machine,
        "dry_run": args.cpu_dry_run,
        "flags": flags,
        "data": size["data"],
        "overrides": size["overrides"],
        "channels_last": "always on CUDA (stages._prepare); not a config key",
        "variants": [],
    }
    with tempfile.TemporaryDirectory(prefix="bnfix-fusion-gpu-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        manifest = write_synthetic_av(root / "data", seed=0, **size["data"])
        result["generate_seconds"] = time.perf_counter() - t0
        print(f"generated {manifest} in {result['generate_seconds']:.1f} s")
        stage1 = root / "runs" / "stage1"
        cfg_path = write_demo_config(root, manifest, stage1, arch="resnet18")
        base = list(size["overrides"])
        t0 = time.perf_counter()
        try:
            console.rule("stage 1 (shared, bf16 autocast on CUDA)")
            summary1 = fusion_tune(load_config(cfg_path, base), stage="1", console=console)
        except Exception:
            print(f"stage 1 FAILED\n{traceback.format_exc()}", file=sys.stderr)
            result["stage1"] = {"error": traceback.format_exc()}
            result["seconds"] = time.perf_counter() - start
            write(result)
            return 1
        result["stage1"] = {
            "seconds": time.perf_counter() - t0,
            "test": {k: v["test"] for k, v in summary1["stage1"].items()},
            "samples_per_s": {
                r["modality"]: r["samples_per_s"]
                for r in map(json.loads, (stage1 / "metrics.jsonl").read_text().splitlines())
            },
        }
        for name, extra in VARIANTS.items():
            try:
                result["variants"].append(
                    run_variant(name, cfg_path, base, extra, stage1, size, console)
                )
            except Exception:  # an OOM in one variant must not lose the other
                print(f"\n{name}: FAILED\n{traceback.format_exc()}", file=sys.stderr)
                result["variants"].append({"variant": name, "error": traceback.format_exc()})
    result["seconds"] = time.perf_counter() - start
    print_table(result["variants"])
    failed = [r["variant"] for r in result["variants"] if "error" in r]
    print(
        f"\n{len(result['variants']) - len(failed)} of {len(VARIANTS)} variants ran"
        + (f" (FAILED: {', '.join(failed)})" if failed else "")
        + f"; {result['seconds']:.0f} s in all"
    )
    write(result)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
