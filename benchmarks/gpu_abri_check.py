"""ABRi on a CUDA GPU, checked once: step cost (bf16, channels_last) and train-mode equivalence.

Meant for one run on a lent GPU machine (H100/H200), well under 3 minutes:

1. ``ABRiBatchNorm2d`` in training mode on CUDA (fp32) against two separate BatchNorms mixed by
   α, written out in float64 on the CPU (batch mean and biased variance for the normalisation,
   running statistics updated with momentum 0.1 and the unbiased variance; also one case with
   α per channel on a channels_last input, and one with cumulative averaging), over 3 steps
   with SGD in lockstep: output, input gradient, α gradient, the γ/β gradients and both BNs'
   running statistics, as max |Δ| / max |reference|; PASS when all are ≤ 1e-4;
2. the ``abri_step.py`` benchmark (plain BN, the naive two-BN ABRi, bnfix's ABRi per layer and
   per channel; train step and eval forward, interleaved, medians, aten ops per step) under
   bf16 autocast and channels_last, at batch 32 × 1x1024x128 and, as a launch-bound contrast,
   batch 8 × 1x256x128.

A stage that raises is recorded (its traceback in the JSON) and the others still run.

Results go to ``$OUT/gpu_abri.json`` when OUT is set. Without CUDA the script says so and
exits with status 2 (writing a JSON that says it was skipped); status 1 means an equivalence
case FAILed. ``--cpu-dry-run`` runs everything small on the CPU, to try the script without a GPU.

    python benchmarks/gpu_abri_check.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from abri_step import (  # a sibling script, not a package
    CHECKED,
    TARGET_EVAL,
    TARGET_TRAIN,
    build_parser,
    machine_line,
    print_table,
    run,
)

from bnfix.abri import ABRiBatchNorm2d

THRESHOLD = 1e-4  # max |got − reference| / max |reference|, fp32 on the GPU against float64
STEPS = 3
BENCHMARKS = {
    "batch 32 × 1x1024x128, bf16 autocast, channels_last": [
        "--batch-size", "32", "--input", "1x1024x128", "--amp", "--channels-last",
        "--repeats", "15", "--warmup", "3", "--iters", "3", "--budget-s", "60",
    ],
    "batch 8 × 1x256x128, bf16 autocast, channels_last (launch-bound)": [
        "--batch-size", "8", "--input", "1x256x128", "--amp", "--channels-last",
        "--repeats", "15", "--warmup", "3", "--iters", "5", "--budget-s", "30",
    ],
}  # fmt: skip
DRY_RUN_BENCHMARK = ["--batch-size", "2", "--input", "1x64x64", "--amp", "--channels-last",
                     "--repeats", "2", "--warmup", "1"]  # fmt: skip
# (name, α per, channels_last input, momentum): momentum None is cumulative averaging, the
# block's other code path.
CASES = [
    ("per layer, contiguous, momentum 0.1", "layer", False, 0.1),
    ("per channel, channels_last, momentum 0.1", "channel", True, 0.1),
    ("per layer, contiguous, cumulative average (momentum None)", "layer", False, None),
]


class RefBN:
    """One BatchNorm2d in float64 on the CPU, as the paper's two-BN form runs it in training."""

    def __init__(self, bn: nn.BatchNorm2d) -> None:
        d = torch.float64
        self.weight = bn.weight.detach().cpu().to(d).clone().requires_grad_(True)
        self.bias = bn.bias.detach().cpu().to(d).clone().requires_grad_(True)
        self.mean = bn.running_mean.detach().cpu().to(d).clone()
        self.var = bn.running_var.detach().cpu().to(d).clone()
        self.count = int(bn.num_batches_tracked)
        self.eps, self.momentum = bn.eps, bn.momentum

    def __call__(self, x: Tensor) -> Tensor:
        shape = (1, -1, 1, 1)
        mean = x.mean(dim=(0, 2, 3))
        var = x.var(dim=(0, 2, 3), unbiased=False)
        n = x.numel() / x.shape[1]
        self.count += 1
        f = 1.0 / self.count if self.momentum is None else self.momentum
        with torch.no_grad():
            self.mean = (1 - f) * self.mean + f * mean
            self.var = (1 - f) * self.var + f * var * n / (n - 1)
        xhat = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        return self.weight.view(shape) * xhat + self.bias.view(shape)


def pretrained_bn(c: int, momentum: float | None, seed: int) -> nn.BatchNorm2d:
    """A BN that looks pretrained: varied γ/β, non-trivial running statistics, a batch count."""
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(c, momentum=momentum)
    with torch.no_grad():
        bn.weight.copy_(torch.randn(c, generator=g) * 0.7)
        bn.bias.copy_(torch.randn(c, generator=g) * 0.3)
        bn.weight[0] = 1e-12  # an abnormal (near-dead) pair, as the paper finds them
        bn.bias[0] = -1e-12
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(torch.rand(c, generator=g) * 3 + 0.05)
        bn.num_batches_tracked.fill_(7)
    return bn


def rel_err(got: Tensor, want: Tensor) -> float:
    """max |got − want| / max |want| (the reference's scale; 1 where the reference is all 0)."""
    want = want.detach().double()
    scale = float(want.abs().max()) or 1.0
    return float((got.detach().double().cpu() - want).abs().max()) / scale


def equivalence_case(
    device: torch.device, per: str, channels_last: bool, momentum: float | None, seed: int
) -> dict:
    """Three training steps of the block on ``device`` against the float64 two-BN reference."""
    c, shape = 32, (8, 32, 24, 20)
    block = ABRiBatchNorm2d.from_batchnorm(pretrained_bn(c, momentum, seed), 0.5, per)
    with torch.no_grad():  # α away from its init, and per channel when it can be
        block.alpha.copy_(torch.linspace(0.2, 0.9, block.alpha.numel()))
    block = block.to(device).train()
    pre, new = block.original, block.additional
    ref_pre, ref_new = RefBN(pre), RefBN(new)
    ref_alpha = block.alpha.detach().cpu().double().clone().requires_grad_(True)
    gen = torch.Generator().manual_seed(100 + seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    worst: dict[str, float] = {}
    for step in range(STEPS):
        x_cpu = torch.randn(shape, generator=gen) * (step + 1) + step
        upstream = torch.randn(shape, generator=gen)
        x = x_cpu.to(device, copy=True).contiguous(memory_format=fmt).requires_grad_(True)
        y = block(x)
        (y * upstream.to(device)).sum().backward()

        xr = x_cpu.double().requires_grad_(True)
        a = ref_alpha.view(1, -1, 1, 1)
        yr = a * ref_pre(xr) + (1 - a) * ref_new(xr)
        (yr * upstream.double()).sum().backward()

        errors = {
            "output": rel_err(y, yr),
            "input grad": rel_err(x.grad, xr.grad),
            "alpha grad": rel_err(block.alpha.grad, ref_alpha.grad),
            "original weight/bias grad": max(
                rel_err(pre.weight.grad, ref_pre.weight.grad),
                rel_err(pre.bias.grad, ref_pre.bias.grad),
            ),
            "additional weight/bias grad": max(
                rel_err(new.weight.grad, ref_new.weight.grad),
                rel_err(new.bias.grad, ref_new.bias.grad),
            ),
            "original running mean/var": max(
                rel_err(pre.running_mean, ref_pre.mean), rel_err(pre.running_var, ref_pre.var)
            ),
            "additional running mean/var": max(
                rel_err(new.running_mean, ref_new.mean), rel_err(new.running_var, ref_new.var)
            ),
            "batch counts": float(
                int(pre.num_batches_tracked) != ref_pre.count
                or int(new.num_batches_tracked) != ref_new.count
            ),
        }
        for key, value in errors.items():
            worst[key] = max(worst.get(key, 0.0), value)
        with torch.no_grad():  # one SGD step on both sides keeps them in lockstep
            pairs = [
                (block.alpha, ref_alpha),
                (pre.weight, ref_pre.weight),
                (pre.bias, ref_pre.bias),
                (new.weight, ref_new.weight),
                (new.bias, ref_new.bias),
            ]
            for p, r in pairs:
                r -= 0.05 * r.grad
                p.copy_(r.to(p.dtype).view_as(p))  # identical parameters again, no drift
                p.grad = None
                r.grad = None
    return {"max_rel_err": worst, "pass": all(v <= THRESHOLD for v in worst.values())}


def equivalence(device: torch.device) -> dict:
    print(f"\ntrain-mode equivalence on {device.type}: ABRiBatchNorm2d (fp32) against two BNs")
    print(
        f"mixed by α in float64 on the CPU, {STEPS} steps; PASS at max rel. error ≤ {THRESHOLD:g}"
    )
    cases = []
    for seed, (name, per, channels_last, momentum) in enumerate(CASES, start=1):
        result = equivalence_case(device, per, channels_last, momentum, seed)
        cases.append({"case": name, **result})
        print(f"  {'PASS' if result['pass'] else 'FAIL'}  {name}")
        for key, value in result["max_rel_err"].items():
            print(f"        {key:30s} {value:.2e}")
    passed = all(c["pass"] for c in cases)
    print(f"equivalence: {'PASS' if passed else 'FAIL'}")
    return {"threshold": THRESHOLD, "steps": STEPS, "pass": passed, "cases": cases}


def benchmarks(device: torch.device, dry_run: bool) -> list[dict]:
    configs = {"dry run (CPU)": DRY_RUN_BENCHMARK} if dry_run else BENCHMARKS
    results = []
    for label, argv in configs.items():
        args = build_parser().parse_args([*argv, "--device", device.type])
        start = time.perf_counter()
        try:
            rows = run(args)
        except Exception:  # an OOM in one configuration must not lose the rest
            print(f"\n{label}: FAILED\n{traceback.format_exc()}", file=sys.stderr)
            results.append({"config": label, "argv": argv, "error": traceback.format_exc()})
            continue
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print()
        print_table(rows, args)
        checked = [r for r in rows if r["key"] in CHECKED]
        meets = all(
            r["train_ratio"] <= TARGET_TRAIN and r["eval_ratio"] <= TARGET_EVAL for r in checked
        )
        results.append(
            {
                "config": label,
                "argv": argv,
                "rows": rows,
                "targets": {"train": TARGET_TRAIN, "eval": TARGET_EVAL},
                "meets_targets": meets,
                "seconds": time.perf_counter() - start,
            }
        )
    return results


def write(result: dict) -> None:
    out = os.environ.get("OUT")
    if out:
        path = Path(out) / "gpu_abri.json"
        path.write_text(json.dumps(result, indent=2))
        print(f"\nwrote {path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cpu-dry-run", action="store_true", help="run small on the CPU, to try the script"
    )
    args = parser.parse_args()
    start = time.perf_counter()
    if args.cpu_dry_run:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
        torch.backends.cudnn.benchmark = True
    else:
        message = (
            "gpu_abri_check: CUDA is not available here (torch.cuda.is_available() is False), "
            "so there is nothing to check; run it on a CUDA machine, or pass --cpu-dry-run"
        )
        print(message, file=sys.stderr)
        write({"skipped": message, "torch": torch.__version__})
        return 2
    machine = machine_line(device)
    print(machine)
    try:
        check = equivalence(device)  # correctness first: it is quick
    except Exception:
        print(f"equivalence check FAILED to run\n{traceback.format_exc()}", file=sys.stderr)
        check = {"pass": False, "error": traceback.format_exc()}
    bench = benchmarks(device, args.cpu_dry_run)
    result = {
        "machine": machine,
        "dry_run": args.cpu_dry_run,
        "equivalence": check,
        "benchmarks": bench,
        "seconds": time.perf_counter() - start,
    }
    for b in bench:
        verdict = "did not run" if "error" in b else "met" if b["meets_targets"] else "MISSED"
        print(f"{b['config']}: targets {verdict}")
    print(f"equivalence {'PASS' if check['pass'] else 'FAIL'}; {result['seconds']:.0f} s in all")
    write(result)
    return 0 if check["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
