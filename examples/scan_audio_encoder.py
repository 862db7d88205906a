"""Use case: is an ImageNet checkpoint a good audio encoder? Scan it on your own recordings.

    python examples/scan_audio_encoder.py [CKPT] [AUDIO_FOLDER]

Without arguments it uses the built-in default (torchvision's ImageNet MobileNetV2) and a
small synthetic probe, like ``bnfix demo``; the CLI equivalent is
``bnfix scan CKPT --modality audio --probe AUDIO_FOLDER``.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from bnfix.architectures import build_model, stem_in_channels
from bnfix.checkpoint import load_checkpoint
from bnfix.default_checkpoint import fetch
from bnfix.probe import adapt_channels, batches, load_probe, write_demo_audio
from bnfix.scan import scan_probe


def main() -> None:
    ckpt_path = Path(sys.argv[1]) if len(sys.argv) > 1 else fetch()
    if len(sys.argv) > 2:
        audio = Path(sys.argv[2])
    else:
        audio = Path(tempfile.mkdtemp()) / "probe"
        write_demo_audio(audio, n=8)

    ckpt = load_checkpoint(ckpt_path)
    model, recognition = build_model(ckpt.state_dict)
    probe = load_probe(audio, "audio")
    x = adapt_channels(probe.tensor, stem_in_channels(model))
    report = scan_probe(ckpt, model, batches(x, 8), modality="audio")

    summary = report.summary
    print(f"{recognition.name}: {summary.dead} of {summary.channels} channels dead on "
          f"{report.probe_samples} clips; capacity used {summary.capacity_used:.1%}")  # fmt: skip
    worst = sorted(report.layers, key=lambda layer: -len(layer.unusable) / layer.channels)[:5]
    for layer in worst:
        print(f"  {layer.name:28s} {len(layer.unusable):4d}/{layer.channels:<4d} dead, "
              f"log variance ratio {layer.log_var_ratio:+.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
