"""``bnfix demo``: the main job on the built-in default, end to end, on any machine.

An ImageNet MobileNetV2 used as an audio encoder is the paper's cross-modal initialisation
case: the demo makes a small audio probe and shows which BN channels that re-use kills.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from rich.console import Console

from bnfix import report
from bnfix.default_checkpoint import MOBILENET_V2, fetch
from bnfix.errors import BnfixError
from bnfix.fusion.config import load_config
from bnfix.fusion.run import fusion_tune
from bnfix.fusion.synthetic import write_demo_config, write_synthetic_av
from bnfix.probe import write_demo_audio
from bnfix.recommend import recommend
from bnfix.repair_run import RepairRequest, run_fold, run_repair
from bnfix.scan_run import ScanRequest, run_scan

#: Test hook: stage-2 epochs of each fusion-tune arm instead of the demo's 4 (the test suite's
#: run of the whole demo; stage 2's two arms are half of the demo's cost, and one epoch from the
#: 4-epoch stage 1 already shows the fused model learning).
STAGE2_EPOCHS_ENV = "_BNFIX_DEMO_STAGE2_EPOCHS"


def run_demo(workdir: Path, device: torch.device, console: Console) -> None:
    if workdir.exists() and not workdir.is_dir():
        raise BnfixError("--workdir exists and is not a folder", workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    console.rule("[bold]bnfix demo[/bold]: an ImageNet checkpoint re-used as an audio encoder")

    console.print(
        f"[bold]1.[/bold] default checkpoint: {MOBILENET_V2.filename} (torchvision, ImageNet)"
    )
    with console.status("fetching (once; cached afterwards)"):
        ckpt = fetch()
    console.print(f"   {ckpt}  sha256 {MOBILENET_V2.sha256[:12]}… verified", highlight=False)

    probe_dir = workdir / "probe-audio"
    files = write_demo_audio(probe_dir)
    console.print(
        f"[bold]2.[/bold] audio probe: {len(files)} synthetic 44.1 kHz stereo clips in {probe_dir} "
        "(16 kHz, 128-bin Kaldi fbank, 1024 frames)",
        highlight=False,
    )

    console.print("[bold]3.[/bold] scan: static signals + the probe in batch-statistics mode")
    request = ScanRequest(checkpoints=[ckpt], modality="audio", probe=probe_dir, device=device)
    scans = run_scan(request, console)
    report.render(scans, console)

    json_path = workdir / "scan.json"
    report.write_json(scans, str(json_path), console)
    console.print(f"wrote {json_path}", highlight=False, markup=False)
    try:
        report.plot(scans, workdir / "scan.png")
        console.print(f"wrote {workdir / 'scan.png'}", highlight=False, markup=False)
    except BnfixError as exc:  # matplotlib is an optional extra
        console.print(f"[dim]no plot: {exc}[/dim]", highlight=False)

    advice = recommend(scans[0]).action
    console.print(
        "[bold]4.[/bold] repair: ABRi (every BN + a fresh twin, mixed by α = 0.5), stem summed "
        "to 1 channel, running statistics recalibrated on the probe; the same probe before "
        f"and after. (The scan recommends '{advice}' for this checkpoint; the demo runs the "
        "whole ABRi flow so that fold and fusion-tune have a repaired encoder to show.)",
        highlight=False,
    )
    repaired = workdir / "mobilenet_v2.abri.safetensors"
    result = run_repair(
        RepairRequest(
            checkpoint=ckpt,
            modality="audio",
            probe=probe_dir,
            recalibrate=True,
            out=repaired,
            force=True,
        ),
        console,
    )
    report.render(
        [result.before, result.after],
        console,
        labels=("before", "after"),
        show_recommendation=False,
    )
    console.print(f"wrote {repaired}", highlight=False, markup=False)

    console.print("[bold]5.[/bold] fold: ABRi blocks back into plain BatchNorm (stock layout)")
    folded = run_fold(repaired, workdir / "mobilenet_v2.folded.safetensors", force=True)
    console.print(
        f"   {folded.blocks} blocks folded; max eval-mode deviation on random inputs "
        f"{folded.max_deviation:.2e} of the output scale; wrote {folded.out}",
        highlight=False,
    )

    console.print(
        "[bold]6.[/bold] fusion-tune on a small generated audio-visual set: the paper's setting, "
        "ImageNet visual encoder + the ABRi-repaired audio encoder; stage 2 with and without "
        "adaptive masking"
    )
    manifest = write_synthetic_av(workdir / "av")
    config = write_demo_config(workdir, manifest.resolve(), (workdir / "fusion-run").resolve())
    overrides = [
        "model.audio_arch=auto",
        "model.visual_arch=auto",
        f"model.audio_init={repaired.resolve().as_posix()}",
        f"model.visual_init={Path(ckpt).resolve().as_posix()}",
        f"run.device={device.type}",
        "stage1.lr=0.005",  # pretrained encoders: a smaller step than training from scratch
        "stage2.lr=0.005",
    ]
    epochs = os.environ.get(STAGE2_EPOCHS_ENV, "")
    if epochs.isdigit() and int(epochs) > 0:
        overrides.append(f"stage2.epochs={epochs}")
    fusion_tune(load_config(config, overrides), force=True, compare=True, console=console)
    console.print(
        f"   config {config}; outputs in {workdir / 'fusion-run'} (summary.json, metrics.jsonl)",
        highlight=False,
    )
    console.print(
        f"Try it on your own checkpoint: bnfix scan CKPT --modality audio --probe {probe_dir}",
        highlight=False,
    )
    console.print(
        f"                               bnfix repair CKPT --modality audio --probe {probe_dir}",
        highlight=False,
    )
