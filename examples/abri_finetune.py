"""Use case: fine-tune an ImageNet checkpoint as an audio encoder with ABRi, in your own loop,
then fold it back so the stock architecture loads the result.

    python examples/abri_finetune.py [CKPT] [--steps N] [--out FOLDER]

Without CKPT it uses the built-in default (torchvision's ImageNet MobileNetV2) and a small
generated set of labelled clips. The CLI equivalent of the first half is
``bnfix repair CKPT --modality audio --probe CLIPS --recalibrate``; of the last,
``bnfix fold REPAIRED --out FOLDED``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

import bnfix
from bnfix.abri import abri_blocks, convert, fold
from bnfix.default_checkpoint import fetch
from bnfix.fusion.features import VisualOptions, load_features
from bnfix.fusion.manifest import read_manifest
from bnfix.fusion.synthetic import write_synthetic_av
from bnfix.probe_audio import AudioOptions
from bnfix.recalibrate import recalibrate
from bnfix.stem import adapt_stem


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", type=Path, help="default: built-in MobileNetV2")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="abri-")))
    args = parser.parse_args()
    torch.manual_seed(0)

    # Labelled spectrograms: 4 classes of generated clips, features as bnfix.fusion makes them.
    manifest = read_manifest(write_synthetic_av(args.out / "data", modalities=("audio",)))
    opts = AudioOptions(num_mel_bins=64, target_frames=96)
    feats = load_features(manifest, opts, VisualOptions(), args.out / "cache")
    train, test = feats.indices("train"), feats.indices("test")
    x, y = feats.audio, feats.labels

    # The pretrained model, its stem summed to 1 channel, every BN an ABRi block (α = 0.5).
    model = bnfix.load(args.checkpoint or fetch())
    print(adapt_stem(model, 1))
    convert(model, alpha=0.5, per="channel")
    model.classifier[-1] = torch.nn.Linear(model.classifier[-1].in_features, len(feats.classes))
    # Start both BNs of every block from the audio's statistics (AdaBN), then fine-tune.
    recalibrate(model, x[train].split(16))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.005, momentum=0.9)
    model.train()
    for step in range(args.steps):
        batch = train[torch.randint(len(train), (16,))]
        loss = F.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {loss.item():.3f}")

    model.eval()
    with torch.no_grad():
        logits = model(x[test])
    alphas = torch.cat([b.alpha.detach() for b in abri_blocks(model).values()])
    print(f"test accuracy {(logits.argmax(1) == y[test]).float().mean():.1%} (chance 25%)")
    low, high = alphas.min(), alphas.max()
    print(f"α after fine-tuning: mean {alphas.mean():.3f}, range {low:.3f}..{high:.3f}")

    # Fold: plain BatchNorm again, same eval outputs; the stock architecture loads it.
    folded = fold(model)
    with torch.no_grad():
        deviation = (folded(x[test]) - logits).abs().max() / logits.abs().max()
    print(f"folded: {len(abri_blocks(folded))} ABRi blocks left, max deviation {deviation:.2e}")
    path = args.out / "audio_encoder.folded.pt"
    torch.save(folded.state_dict(), path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
