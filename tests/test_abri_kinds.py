"""ABRi for every BatchNorm kind, against a float64 two-module reference.

The reference is the paper's block written out with real torch modules in float64: two separate
BNs of the layer's own normalisation (copies of the pretrained BN and of the fresh twin), mixed
by α, then what the kind runs after normalising (timm's ``drop`` and ``act``). Checked over
several training steps: outputs, input and parameter gradients, both BNs' running statistics
(momentum 0.1 and None), α per layer and per channel; then eval mode, the fold (each layer's own
class back), SyncBatchNorm and DDP in a 2-process gloo run, fold exactness on timm and torchvision
video models, and how convert reports what it converts and skips.
"""

from __future__ import annotations

import copy
import functools
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from helpers import one_error_line, run_inprocess
from test_abri import assert_scaled_close, ddp_lockstep
from timm.layers import BatchNormAct2d
from torch import nn

from bnfix.abri import ABRiBatchNorm2d, abri_blocks, convert, convert_report, fold
from bnfix.batchnorm import ABRiBatchNorm, kind_of
from bnfix.errors import BnfixError
from bnfix.probe_stats import collect
from bnfix.recalibrate import recalibrate


def pretrained(bn: nn.Module, seed: int) -> nn.Module:
    """Give a BN the look of a pretrained one: varied γ/β, running statistics, a batch count."""
    g = torch.Generator().manual_seed(seed)
    c = bn.num_features
    with torch.no_grad():
        bn.weight.copy_(torch.randn(c, generator=g) * 0.7)
        bn.bias.copy_(torch.randn(c, generator=g) * 0.3)
        bn.weight[0], bn.bias[0] = 1e-12, -1e-12  # an abnormal pair
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(torch.rand(c, generator=g) * 3 + 0.05)
        bn.num_batches_tracked.fill_(7)
    return bn


class Reference(nn.Module):
    """``after(α·BN_pre(x) + (1 − α)·BN_new(x))`` from copies of a block's modules, in float64."""

    def __init__(self, block: ABRiBatchNorm) -> None:
        super().__init__()
        pre = copy.deepcopy(block.original).double()
        self.drop = getattr(pre, "drop", None)
        self.act = getattr(pre, "act", None)
        if self.act is not None:  # the normalisation alone; drop and act run after the mix
            pre.drop, pre.act = nn.Identity(), nn.Identity()
        self.pre = pre
        self.new = copy.deepcopy(block.additional).double()
        self.alpha = nn.Parameter(block.alpha.detach().double().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.alpha.view(1, -1, *[1] * (x.dim() - 2))
        y = a * self.pre(x) + (1 - a) * self.new(x)
        if self.drop is not None:
            y = self.drop(y)
        return self.act(y) if self.act is not None else y


def pairs(block: ABRiBatchNorm, ref: Reference) -> list[tuple[nn.Parameter, nn.Parameter]]:
    return [
        (block.alpha, ref.alpha),
        (block.original.weight, ref.pre.weight),
        (block.original.bias, ref.pre.bias),
        (block.additional.weight, ref.new.weight),
        (block.additional.bias, ref.new.bias),
    ]


def statistics(block: ABRiBatchNorm, ref: Reference) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [
        (block.original.running_mean, ref.pre.running_mean),
        (block.original.running_var, ref.pre.running_var),
        (block.additional.running_mean, ref.new.running_mean),
        (block.additional.running_var, ref.new.running_var),
    ]


def drop_layer() -> nn.Module:
    return nn.Dropout(0.25)


C = 5
KINDS = {
    # name: (the layer, the input shape)
    "BatchNorm1d-2d": (lambda: nn.BatchNorm1d(C), (12, C)),
    "BatchNorm1d-3d": (lambda: nn.BatchNorm1d(C), (4, C, 9)),
    "BatchNorm2d": (lambda: nn.BatchNorm2d(C), (3, C, 4, 5)),
    "BatchNorm3d": (lambda: nn.BatchNorm3d(C), (2, C, 3, 4, 4)),
    "SyncBatchNorm (one process)": (lambda: nn.SyncBatchNorm(C), (3, C, 4, 4)),
    "BatchNormAct2d SiLU+drop": (
        lambda: BatchNormAct2d(C, act_layer=nn.SiLU, drop_layer=drop_layer),
        (3, C, 4, 5),
    ),
}


def _seeded(seed: int, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(seed)  # the same dropout mask on both sides
    return module(x)


@pytest.mark.parametrize("per", ["layer", "channel"])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("kind", list(KINDS))
def test_every_kind_matches_two_bns_over_training_steps(kind, momentum, per):
    make, shape = KINDS[kind]
    bn = pretrained(make(), seed=1)
    bn.momentum = momentum
    model = nn.Sequential(bn)
    report = convert_report(model, alpha=0.5, per=per)
    assert report.converted == {"0": type(bn).__name__} and not report.skipped
    block = model[0]
    assert isinstance(block, ABRiBatchNorm2d) and block.original is bn
    with torch.no_grad():
        block.alpha.copy_(torch.linspace(0.2, 0.9, block.alpha.numel()))
    ref = Reference(block)
    block.train()
    ref.train()
    gen = torch.Generator().manual_seed(123)
    for step in range(3):
        x = (torch.randn(shape, generator=gen) * (step + 1) + step).requires_grad_(True)
        xr = x.detach().double().requires_grad_(True)
        upstream = torch.randn(shape, generator=gen)
        y, yr = _seeded(step, block, x), _seeded(step, ref, xr)
        assert_scaled_close(y, yr, 1e-5)
        (y * upstream).sum().backward()
        (yr * upstream.double()).sum().backward()
        assert_scaled_close(x.grad, xr.grad, 1e-5)
        for p, r in pairs(block, ref):
            assert_scaled_close(p.grad, r.grad, 1e-5)
        for got, want in statistics(block, ref):
            assert_scaled_close(got, want, 1e-6)
        assert int(block.original.num_batches_tracked) == int(ref.pre.num_batches_tracked)
        assert int(block.additional.num_batches_tracked) == int(ref.new.num_batches_tracked)
        with torch.no_grad():  # an SGD step on both sides keeps them in lockstep
            for p, r in pairs(block, ref):
                p -= 0.05 * p.grad
                r -= 0.05 * r.grad
                p.grad = r.grad = None

    block.eval()
    ref.eval()
    x = torch.randn(shape, generator=gen) * 2
    assert_scaled_close(block(x), ref(x.double()), 1e-5)
    # Fold: the layer's own class (with its act and drop), the same eval map.
    folded = fold(copy.deepcopy(block))
    assert type(folded) is type(bn) and not folded.training
    if isinstance(bn, BatchNormAct2d):
        assert isinstance(folded.act, nn.SiLU) and isinstance(folded.drop, nn.Dropout)
    assert_scaled_close(folded(x), ref(x.double()), 1e-5)


def test_batch_norm_act_runs_drop_then_act_after_the_mix_and_checks_its_input():
    bn = pretrained(BatchNormAct2d(3, act_layer=nn.ReLU), seed=2)
    block = convert(nn.Sequential(bn))[0].eval()
    x = torch.randn(2, 3, 4, 4)
    assert bool((block(x) >= 0).all())  # the ReLU ran
    with pytest.raises(ValueError, match="expected 4D input"):
        block(torch.randn(2, 3, 4))
    assert kind_of(bn).act and not kind_of(nn.BatchNorm3d(2)).act


# --- SyncBatchNorm in a 2-process run ------------------------------------------------------------
# torch has no CPU kernels for SyncBatchNorm, and DistributedDataParallel refuses to wrap one on
# CPU ("SyncBatchNorm layers only work with GPU modules"); the ABRi block synchronises on CPU
# with autograd-aware all-reduces. So the gloo run here averages the gradients over the ranks as
# DDP's reducer does; on CUDA the block runs torch's own SyncBatchNorm kernels.


def _sync_worker(rank: int, world: int, init_file: str, ddp_file: str) -> None:
    import torch.distributed as dist
    from timm.layers import convert_sync_batchnorm

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        configs = [(m, per, False) for m in (0.1, None) for per in ("layer", "channel")]
        configs += [(0.1, "channel", True)]
        for momentum, per, act in configs:
            _sync_config(rank, world, momentum, per, act, convert_sync_batchnorm)
        ddp_lockstep(rank, ddp_file)  # test_abri's DDP check, in the same pair of processes
    finally:
        dist.destroy_process_group()


def _sync_config(rank, world, momentum, per, act, convert_sync_batchnorm) -> None:
    import torch.distributed as dist

    torch.manual_seed(0)  # the same weights on every rank
    if act:  # timm's SyncBatchNormAct, as timm.layers.convert_sync_batchnorm makes it
        bn = convert_sync_batchnorm(pretrained(BatchNormAct2d(C, act_layer=nn.SiLU), seed=3))
    else:
        bn = pretrained(nn.SyncBatchNorm(C), seed=3)
    bn.momentum = momentum
    model = convert(nn.Sequential(bn), per=per)
    block = model[0]
    with torch.no_grad():
        block.alpha.copy_(torch.linspace(0.2, 0.9, block.alpha.numel()))
    # The reference: plain float64 BNs on the global batch (what synchronisation must give).
    plain = nn.BatchNorm2d(C, momentum=momentum)
    plain.load_state_dict(bn.state_dict())
    ref = Reference(ABRiBatchNorm.from_batchnorm(plain, per=per))
    ref.act = nn.SiLU() if act else None
    with torch.no_grad():
        ref.alpha.copy_(block.alpha.double())
    gen = torch.Generator().manual_seed(42)  # the same global batch on every rank
    for step in range(3):
        x_all = torch.randn(2 * world, C, 4, 3, generator=gen) * (step + 1) + step
        upstream = torch.randn(x_all.shape, generator=gen)
        part = slice(2 * rank, 2 * rank + 2)  # each rank its own part of the global batch
        x = x_all[part].clone().requires_grad_(True)
        xr = x_all.double().requires_grad_(True)
        y, yr = model(x), ref(xr)
        assert_scaled_close(y, yr[part], 1e-5)
        (y * upstream[part]).sum().backward()
        for p in model.parameters():  # what DDP's reducer does: the mean over ranks
            dist.all_reduce(p.grad)
            p.grad /= world
        (yr * upstream.double()).sum().backward()
        assert_scaled_close(x.grad, xr.grad[part], 1e-5)
        for p, r in pairs(block, ref):  # DDP averages over ranks: the global gradient / world
            assert_scaled_close(p.grad * world, r.grad, 1e-5)
        for got, want in statistics(block, ref):
            assert_scaled_close(got, want, 1e-6)
        with torch.no_grad():
            for p, r in pairs(block, ref):
                p -= 0.05 * p.grad * world
                r -= 0.05 * r.grad
                p.grad = r.grad = None
    folded = fold(copy.deepcopy(block))
    assert type(folded) is type(bn)


def test_sync_batch_norm_and_ddp_in_a_two_process_gloo_run(tmp_path):
    import torch.multiprocessing as mp

    ddp_file = str(tmp_path / "ddp_state.pt")
    mp.spawn(_sync_worker, args=(2, str(tmp_path / "init"), ddp_file), nprocs=2, join=True)
    assert torch.load(ddp_file + ".ok")["ok"]  # DDP kept the ABRi blocks in lockstep


# --- convert: what it converts, skips, refuses --------------------------------------------------


def test_convert_reports_converted_and_skipped_layers():
    frozen = torchvision.ops.FrozenBatchNorm2d(4)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1),
        nn.BatchNorm2d(4),
        nn.BatchNorm2d(4, affine=False),
        nn.BatchNorm2d(4, track_running_stats=False),
        frozen,
        BatchNormAct2d(4),
        nn.Flatten(),
        nn.BatchNorm1d(4 * 2 * 2),
    )
    report = convert_report(model)
    assert report.converted == {"1": "BatchNorm2d", "5": "BatchNormAct2d", "7": "BatchNorm1d"}
    assert set(report.skipped) == {"2", "3", "4"}
    assert "affine" in report.skipped["2"] and "running statistics" in report.skipped["3"]
    assert "frozen" in report.skipped["4"] and model[4] is frozen
    assert "3 BatchNorm layers converted" in report.summary() and "3 skipped" in report.summary()
    # convert() returns the model and says what it skipped; a second run keeps the blocks.
    with pytest.warns(UserWarning, match=r"left 3 normalisation layers as they were"):
        assert convert(model) is model
    assert convert_report(model).kept == ["1", "5", "7"]
    with pytest.raises(BnfixError, match=r"ABRi cannot convert 2: no affine"):
        convert(model, only=["2"])
    # repair's abri strategy carries the same account
    from bnfix.repair import apply_strategy

    fresh = nn.Sequential(
        nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), torchvision.ops.FrozenBatchNorm2d(4)
    )
    with pytest.warns(UserWarning, match="1 skipped"):
        outcome = apply_strategy(fresh, "abri")
    assert outcome.layers == 1 and outcome.skipped == {"2": report.skipped["4"]}


def test_a_kind_abri_cannot_take_is_one_clear_error():
    from timm.layers.split_batchnorm import SplitBatchNorm2d

    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), SplitBatchNorm2d(4, num_splits=2))
    with pytest.raises(BnfixError) as info:
        convert(model)
    message = str(info.value)
    assert "\n" not in message and message.startswith("2 is a timm.layers.split_batchnorm")
    assert "SplitBatchNorm2d.forward" in message and "only=" in message
    assert not abri_blocks(model)  # nothing changed
    lazy = nn.Sequential(nn.LazyBatchNorm2d())
    with pytest.raises(BnfixError, match="run one forward"):
        convert(lazy)
    convert(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), SplitBatchNorm2d(4)), only=["1"])


FACTORY = """
    from torch import nn
    from timm.layers.split_batchnorm import SplitBatchNorm2d

    def split_net():
        return nn.Sequential(nn.Conv2d(3, 4, 3), SplitBatchNorm2d(4, num_splits=2), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
"""


def test_repair_refuses_a_kind_abri_cannot_take_in_one_line(tmp_path, monkeypatch):
    (tmp_path / "bnfix_kind_factories.py").write_text(textwrap.dedent(FACTORY))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "bnfix_kind_factories", raising=False)
    import bnfix_kind_factories

    ckpt = tmp_path / "split.pt"
    torch.save(bnfix_kind_factories.split_net().state_dict(), ckpt)
    out = tmp_path / "split.abri.safetensors"
    arch = "bnfix_kind_factories:split_net"
    run = run_inprocess("repair", ckpt, "--modality", "visual", "--arch", arch, "--out", out)
    assert run.code == 2
    line = one_error_line(run.stderr)
    assert "SplitBatchNorm2d" in line and "forward" in line
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir() if "split" in p.name) == [
        "split.pt"
    ]


# --- fold exactness on real models --------------------------------------------------------------


def perturb(model: nn.Module, seed: int) -> None:
    """α, the twins and their statistics away from their fresh values, as after fine-tuning."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in abri_blocks(model).values():
            new, c = block.additional, block.num_features
            block.alpha.copy_(torch.rand(block.alpha.shape, generator=g))
            new.weight.copy_(torch.rand(c, generator=g) + 0.5)
            new.bias.copy_(torch.randn(c, generator=g) * 0.2)
            new.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
            new.running_var.copy_(torch.rand(c, generator=g) + 0.5)


# The smallest member of each family: timm's test_* models are the real EfficientNet (SE,
# BatchNormAct2d with SiLU) and ResNet-D (deep stem, avg-pool downsample) classes at toy widths.
STOCK = {
    "test_efficientnet": (lambda: timm.create_model("test_efficientnet"), (2, 3, 64, 64)),
    "regnety_002": (lambda: timm.create_model("regnety_002"), (2, 3, 64, 64)),
    "densenet121": (lambda: timm.create_model("densenet121"), (2, 3, 32, 32)),
    "test_resnet": (lambda: timm.create_model("test_resnet"), (2, 3, 64, 64)),
    "r2plus1d_18": (lambda: torchvision.models.video.r2plus1d_18(), (1, 3, 4, 32, 32)),
}


@pytest.mark.parametrize("name", list(STOCK))
def test_fold_is_exact_and_loads_strictly_into_the_stock_model(name):
    make, shape = STOCK[name]
    torch.manual_seed(0)
    model = make()
    stock = copy.deepcopy(model)  # what the factory builds, without building it twice
    classes = {n: type(m) for n, m in model.named_modules()}
    report = convert_report(model, per="channel" if len(name) % 2 else "layer")
    assert report.converted and not report.skipped
    perturb(model, seed=1)
    model.eval()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(x)
        folded = fold(model)
        after = folded(x)
    assert not abri_blocks(folded)
    assert {n: type(m) for n, m in folded.named_modules()} == classes  # each layer's own class
    error = float((after.double() - before.double()).abs().max() / before.double().abs().max())
    assert error <= 1e-5
    stock.load_state_dict(folded.state_dict(), strict=True)


# --- checkpoints, probe, recalibration ----------------------------------------------------------


def test_existing_abri_checkpoints_still_load():
    """The keys bnfix has always written (``P.original.*``, ``P.additional.*``, ``P.alpha``)."""
    from bnfix.loading import model_from_state

    torch.manual_seed(0)
    stock = torchvision.models.resnet18(num_classes=3)
    state = {}
    bn_names = {n for n, m in stock.named_modules() if isinstance(m, nn.BatchNorm2d)}
    for key, value in stock.state_dict().items():
        prefix, _, leaf = key.rpartition(".")
        if prefix in bn_names:
            state[f"{prefix}.original.{leaf}"] = value
            fresh = nn.BatchNorm2d(value.numel() if value.dim() else 1).state_dict()[leaf]
            state[f"{prefix}.additional.{leaf}"] = fresh
            state.setdefault(f"{prefix}.alpha", torch.tensor([0.25]))
        else:
            state[key] = value
    model, _ = model_from_state(state)
    assert set(abri_blocks(model)) == bn_names
    assert model.state_dict().keys() == state.keys()
    # and a timm BatchNormAct2d model, saved from ABRi, rebuilds through --arch timm:NAME
    timm_model = convert(timm.create_model("mobilenetv3_small_050"))
    perturb(timm_model, seed=3)
    rebuilt, _ = model_from_state(timm_model.state_dict(), "timm:mobilenetv3_small_050")
    assert type(abri_blocks(rebuilt)["bn1"].original) is BatchNormAct2d
    for key, value in timm_model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value), key


def test_probe_and_recalibration_treat_each_block_as_one_layer():
    def net() -> nn.Module:
        torch.manual_seed(4)
        return nn.Sequential(
            nn.Conv3d(2, 4, 1), nn.BatchNorm3d(4), nn.Flatten(2), nn.BatchNorm1d(4),
            nn.Unflatten(2, (3, 4, 4)), nn.Flatten(1, 2), nn.Conv2d(12, 6, 1),
            BatchNormAct2d(6, act_layer=nn.SiLU, drop_layer=drop_layer),
        )  # fmt: skip

    batches = [torch.randn(4, 2, 3, 4, 4, generator=torch.Generator().manual_seed(i)) * 3 + 1
               for i in range(3)]  # fmt: skip
    plain = net()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        abri = convert(net(), alpha=1.0)  # α = 1: exactly the pretrained BNs
    want, got = collect(plain, batches), collect(abri, batches)
    assert list(got) == ["1", "3", "7"] == list(want)
    for name in want:
        for field in ("active_fraction", "dead_sample_fraction", "input_mean", "input_var"):
            torch.testing.assert_close(getattr(got[name], field), getattr(want[name], field))

    seen: list[bool] = []
    abri[7].original.drop.register_forward_pre_hook(lambda m, a: seen.append(m.training))
    assert recalibrate(abri.train(), batches) == 3
    assert seen == [False, False, False]  # the drop stayed off while the statistics were taken
    assert abri.training and abri[7].training and abri[7].original.drop.training
    for block in abri_blocks(abri).values():
        torch.testing.assert_close(block.original.running_mean, block.additional.running_mean)
        torch.testing.assert_close(block.original.running_var, block.additional.running_var)
        assert int(block.original.num_batches_tracked) == 3


# --- the example --------------------------------------------------------------------------------


@functools.cache
def _examples() -> Path:
    return Path(__file__).resolve().parents[1] / "examples"


def test_timm_finetune_example_folds_into_the_stock_timm_model(tmp_path):
    done = subprocess.run(
        [sys.executable, _examples() / "timm_abri_finetune.py", "--model", "mobilenetv3_small_050",
         "--steps", "2", "--size", "32", "--images", "16", "--out", tmp_path],
        capture_output=True,
        text=True,
        timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "loads strictly into timm.create_model('mobilenetv3_small_050'" in done.stdout
    assert "BatchNormAct2d" in done.stdout  # the convert report names the kinds it converted
    deviation = float(done.stdout.split("max deviation ")[1].split()[0])
    assert deviation <= 1e-5
    stock = timm.create_model("mobilenetv3_small_050", num_classes=4)
    stock.load_state_dict(torch.load(tmp_path / "mobilenetv3_small_050.folded.pt"), strict=True)


def test_convert_sync_batchnorm_may_run_after_convert():
    torch.manual_seed(5)
    model = convert(nn.Sequential(nn.Conv2d(3, 4, 1), pretrained(nn.BatchNorm2d(4), seed=6)))
    with torch.no_grad():
        model[1].alpha.fill_(0.3)
    ref = copy.deepcopy(model)
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    block = synced[1]
    assert isinstance(block, ABRiBatchNorm) and type(block.original) is nn.SyncBatchNorm
    x = torch.randn(3, 3, 4, 4)
    torch.testing.assert_close(synced(x), ref(x))  # one process: nothing to synchronise
    torch.testing.assert_close(block.original.running_var, ref[1].original.running_var)
    assert type(fold(synced)[1]) is nn.SyncBatchNorm
