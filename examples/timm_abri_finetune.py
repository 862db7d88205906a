"""Use case: fine-tune a timm model with ABRi in your own loop, then fold it back so that
``timm.create_model`` loads the result strictly.

    python examples/timm_abri_finetune.py [CKPT] [--model efficientnet_b0] [--steps N]
                                          [--size PIXELS] [--images N] [--out FOLDER]

timm's EfficientNet, RegNet, DenseNet, MobileNet... normalise with ``BatchNormAct2d`` (BN, then
drop and activation in one module); ABRi converts those like plain BatchNorms and the fold gives
each one back with its activation, so the folded state dict is timm's own layout.

CKPT is a state dict of ``--model`` (a timm hub download, your own fine-tune); without it the
model starts from random weights standing in for pretrained ones (bnfix needs no network). The
data are a small generated set of labelled images (4 classes of oriented stripes). The CLI
equivalent of the first half is ``bnfix repair CKPT --arch timm:NAME --modality visual``; of
the last, ``bnfix fold REPAIRED --arch timm:NAME --out FOLDED``.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

import bnfix
from bnfix.abri import abri_blocks, convert_report, fold
from bnfix.recalibrate import recalibrate


def stripes(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images of noisy stripes at one of 4 orientations (the label), ImageNet-normalised."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(4, (n,), generator=g)
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    angles = labels.float() * math.pi / 4
    phase = torch.rand(n, generator=g) * 2 * math.pi
    along = xs * torch.cos(angles).view(-1, 1, 1) + ys * torch.sin(angles).view(-1, 1, 1)
    wave = torch.sin(along * (2 * math.pi / 8) + phase.view(-1, 1, 1))
    images = wave.unsqueeze(1).expand(-1, 3, -1, -1) + 0.3 * torch.randn(
        n, 3, size, size, generator=g
    )
    return images, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", type=Path, help="a state dict of --model")
    parser.add_argument("--model", default="efficientnet_b0", help="a timm model name")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--images", type=int, default=96, help="training images (test: a third)")
    parser.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="abri-timm-")))
    args = parser.parse_args()
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)

    if args.checkpoint is not None:
        model = bnfix.load(args.checkpoint, arch=f"timm:{args.model}")
    else:
        print(f"no checkpoint given: {args.model} from random weights (pass CKPT for real ones)")
        model = timm.create_model(args.model)
    model.reset_classifier(4)

    # Every BatchNorm (timm's BatchNormAct2d included) an ABRi block, α = 0.5 per channel.
    print(convert_report(model, alpha=0.5, per="channel").summary())

    x, y = stripes(args.images, args.size, seed=1)
    x_test, y_test = stripes(max(2, args.images // 3), args.size, seed=2)
    # Start both BNs of every block from the target data's statistics (AdaBN), then fine-tune.
    recalibrate(model, x.split(16))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    for step in range(args.steps):
        batch = torch.randint(len(x), (16,))
        loss = F.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {loss.item():.3f}")

    model.eval()
    with torch.no_grad():
        logits = model(x_test)
    alphas = torch.cat([b.alpha.detach() for b in abri_blocks(model).values()])
    print(f"test accuracy {(logits.argmax(1) == y_test).float().mean():.1%} (chance 25%)")
    low, high = alphas.min(), alphas.max()
    print(f"α after fine-tuning: mean {alphas.mean():.3f}, range {low:.3f}..{high:.3f}")

    # Fold: each block back to the layer's own class (BatchNormAct2d with its activation).
    folded = fold(model)
    with torch.no_grad():
        deviation = (folded(x_test) - logits).abs().max() / logits.abs().max()
    print(f"folded: {len(abri_blocks(folded))} ABRi blocks left, max deviation {deviation:.2e}")
    path = args.out / f"{args.model}.folded.pt"
    torch.save(folded.state_dict(), path)
    stock = timm.create_model(args.model, num_classes=4)
    stock.load_state_dict(torch.load(path), strict=True)
    print(f"wrote {path}; it loads strictly into timm.create_model({args.model!r}, num_classes=4)")


if __name__ == "__main__":
    main()
