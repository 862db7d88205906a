"""ABRi against the paper's formula, written here in float64: two separate BatchNorms mixed by α."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from bnfix.abri import ABRiBatchNorm2d, abri_blocks, convert, fold
from bnfix.errors import BnfixError


class RefBN:
    """A BatchNorm written out in float64, as the paper's two-BN form needs it."""

    def __init__(self, weight, bias, mean, var, count, eps, momentum):
        d = torch.float64
        self.weight = weight.detach().to(d).clone().requires_grad_(True)
        self.bias = bias.detach().to(d).clone().requires_grad_(True)
        self.mean, self.var = mean.detach().to(d).clone(), var.detach().to(d).clone()
        self.count, self.eps, self.momentum = int(count), eps, momentum

    def __call__(self, x: torch.Tensor, training: bool) -> torch.Tensor:
        shape = (1, -1, 1, 1)
        if training:
            m = x.mean(dim=(0, 2, 3))
            v = x.var(dim=(0, 2, 3), unbiased=False)
            n = x.numel() / x.shape[1]
            self.count += 1
            f = 1 / self.count if self.momentum is None else self.momentum
            with torch.no_grad():
                self.mean = (1 - f) * self.mean + f * m
                self.var = (1 - f) * self.var + f * v * n / (n - 1)
        else:
            m, v = self.mean, self.var
        xhat = (x - m.view(shape)) / torch.sqrt(v.view(shape) + self.eps)
        return self.weight.view(shape) * xhat + self.bias.view(shape)


def assert_scaled_close(got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    """max |got − want| ≤ tol × max |want|: float32 against float64, at the output's scale."""
    scale = float(want.detach().abs().max()) or 1.0
    err = float((got.detach().double() - want.detach().double()).abs().max())
    assert err <= tol * scale, f"max |Δ| {err:.3g} > {tol:g} × scale {scale:.3g}"


def pretrained_bn(c: int, momentum: float | None, seed: int) -> nn.BatchNorm2d:
    """A BN that looks pretrained: varied γ/β, non-trivial running statistics, a batch count."""
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(c, momentum=momentum)
    with torch.no_grad():
        bn.weight.copy_(torch.randn(c, generator=g) * 0.7)
        bn.bias.copy_(torch.randn(c, generator=g) * 0.3)
        bn.weight[0] = 1e-12  # an abnormal pair, as the paper finds them
        bn.bias[0] = -1e-12
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(torch.rand(c, generator=g) * 3 + 0.05)
        bn.num_batches_tracked.fill_(7)
    return bn


@pytest.mark.parametrize("per", ["layer", "channel"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_training_matches_two_bn_reference_over_steps(per, momentum):
    c = 6
    block = ABRiBatchNorm2d.from_batchnorm(pretrained_bn(c, momentum, seed=1), alpha=0.5, per=per)
    with torch.no_grad():  # α away from its init, per channel when it can be
        block.alpha.copy_(torch.linspace(0.2, 0.9, block.alpha.numel()))
    pre, new = block.original, block.additional
    ref_pre = RefBN(pre.weight, pre.bias, pre.running_mean, pre.running_var, 7, pre.eps, momentum)
    ref_new = RefBN(new.weight, new.bias, new.running_mean, new.running_var, 0, new.eps, momentum)
    ref_alpha = block.alpha.detach().double().clone().requires_grad_(True)
    block.train()
    gen = torch.Generator().manual_seed(123)
    for step in range(4):
        x = (torch.randn(5, c, 7, 6, generator=gen) * (step + 1) + step).requires_grad_(True)
        xr = x.detach().double().requires_grad_(True)
        upstream = torch.randn(5, c, 7, 6, generator=gen)

        y = block(x)
        a = ref_alpha.view(1, -1, 1, 1)
        yr = a * ref_pre(xr, True) + (1 - a) * ref_new(xr, True)
        assert_scaled_close(y, yr, 1e-5)

        (y * upstream).sum().backward()
        (yr * upstream.double()).sum().backward()
        pairs = [
            (x.grad, xr.grad),
            (block.alpha.grad, ref_alpha.grad),
            (pre.weight.grad, ref_pre.weight.grad),
            (pre.bias.grad, ref_pre.bias.grad),
            (new.weight.grad, ref_new.weight.grad),
            (new.bias.grad, ref_new.bias.grad),
        ]
        for got, want in pairs:
            assert_scaled_close(got, want, 1e-5)
        for got, want in [
            (pre.running_mean, ref_pre.mean),
            (pre.running_var, ref_pre.var),
            (new.running_mean, ref_new.mean),
            (new.running_var, ref_new.var),
        ]:
            assert_scaled_close(got, want, 1e-6)
        assert int(pre.num_batches_tracked) == 8 + step and int(new.num_batches_tracked) == 1 + step
        with torch.no_grad():  # an SGD step on both sides keeps them in lockstep
            for p, r in [
                (block.alpha, ref_alpha),
                (pre.weight, ref_pre.weight),
                (pre.bias, ref_pre.bias),
                (new.weight, ref_new.weight),
                (new.bias, ref_new.bias),
            ]:
                p -= 0.01 * p.grad
                r -= 0.01 * r.grad
                p.grad = None
                r.grad = None

    block.eval()
    x = torch.randn(3, c, 5, 5, generator=gen) * 2
    a = ref_alpha.detach().view(1, -1, 1, 1)
    want = a * ref_pre(x.double(), False) + (1 - a) * ref_new(x.double(), False)
    assert_scaled_close(block(x), want, 1e-5)


def test_eval_gradients_match_reference():
    """Fine-tuning with BN frozen in eval mode still trains α, γ and β correctly."""
    block = ABRiBatchNorm2d.from_batchnorm(pretrained_bn(4, 0.1, seed=2), per="channel").eval()
    with torch.no_grad():
        block.additional.running_mean.uniform_(-1, 1)
        block.additional.running_var.uniform_(0.5, 2)
    pre, new = block.original, block.additional
    ref_pre = RefBN(pre.weight, pre.bias, pre.running_mean, pre.running_var, 0, pre.eps, 0.1)
    ref_new = RefBN(new.weight, new.bias, new.running_mean, new.running_var, 0, new.eps, 0.1)
    ref_alpha = block.alpha.detach().double().clone().requires_grad_(True)
    x = torch.randn(3, 4, 5, 5)
    block(x).pow(2).sum().backward()
    a = ref_alpha.view(1, -1, 1, 1)
    (a * ref_pre(x.double(), False) + (1 - a) * ref_new(x.double(), False)).pow(2).sum().backward()
    for got, want in [
        (block.alpha.grad, ref_alpha.grad),
        (pre.weight.grad, ref_pre.weight.grad),
        (new.bias.grad, ref_new.bias.grad),
    ]:
        assert_scaled_close(got, want, 1e-5)


def test_fresh_twin_and_state_dict_keys():
    bn = pretrained_bn(8, 0.1, seed=3)
    snapshot = {k: v.clone() for k, v in bn.state_dict().items()}
    model = nn.Sequential(nn.Conv2d(3, 8, 3), bn, nn.ReLU())
    convert(model, alpha=0.3, per="channel")
    sd = model.state_dict()
    for k, v in snapshot.items():
        assert torch.equal(sd[f"1.original.{k}"], v)  # the pretrained BN is kept bit-exact
    assert torch.equal(sd["1.additional.weight"], torch.ones(8))
    assert torch.equal(sd["1.additional.bias"], torch.zeros(8))
    assert torch.equal(sd["1.additional.running_mean"], torch.zeros(8))
    assert torch.equal(sd["1.additional.running_var"], torch.ones(8))
    assert torch.equal(sd["1.alpha"], torch.full((8,), 0.3))
    assert model[1].additional.momentum == bn.momentum and model[1].additional.eps == bn.eps


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_fold_is_exact_in_eval_mode(arch):
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(num_classes=10)
    convert(model, alpha=0.5, per="channel" if arch == "resnet18" else "layer")
    # Fine-tune a little so α, both γ/β and both running statistics differ from their init.
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(2):
        loss = model(torch.randn(4, 3, 32, 32)).logsumexp(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        folded = fold(copy.deepcopy(model))
        after = folded(x)
    assert not abri_blocks(folded)
    assert not folded.training and all(not m.training for m in folded.modules())
    assert _relative_error(after, before) <= 1e-5
    # The folded model loads into the stock architecture.
    stock = getattr(torchvision.models, arch)(num_classes=10)
    stock.load_state_dict(folded.state_dict(), strict=True)


def test_fold_is_exact_in_training_mode_once_statistics_agree():
    block = ABRiBatchNorm2d.from_batchnorm(pretrained_bn(5, 0.1, seed=4), per="channel")
    with torch.no_grad():
        block.alpha.copy_(torch.tensor([0.1, 0.4, 0.5, 0.8, 1.0]))
        block.additional.weight.uniform_(0.5, 1.5)
        block.additional.bias.uniform_(-0.5, 0.5)
        block.additional.running_mean.copy_(block.original.running_mean)
        block.additional.running_var.copy_(block.original.running_var)
    folded = fold(copy.deepcopy(block))
    assert isinstance(folded, nn.BatchNorm2d) and folded.training
    x = torch.randn(4, 5, 6, 6)
    torch.testing.assert_close(folded(x), block(x), rtol=1e-5, atol=1e-5)
    for mode in (block, folded):
        mode.eval()
    torch.testing.assert_close(folded(x), block(x), rtol=1e-5, atol=1e-5)


def test_fold_keeps_each_modules_mode():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
    )
    convert(model)
    model[1].eval()
    folded = fold(model)
    assert type(folded[1]) is nn.BatchNorm2d and type(folded[3]) is nn.BatchNorm2d
    assert not folded[1].training and folded[3].training


def test_convert_only_named_layers_and_refusals():
    model = torchvision.models.resnet18(num_classes=3)
    convert(model, only=["bn1", "layer1.0.bn2"])
    assert set(abri_blocks(model)) == {"bn1", "layer1.0.bn2"}
    with pytest.raises(BnfixError, match=r"no BatchNorm named layer9\.bn"):
        convert(torchvision.models.resnet18(), only=["layer9.bn"])
    with pytest.raises(BnfixError, match=r"alpha must be in \[0, 1\]"):
        convert(torchvision.models.resnet18(), alpha=1.5)
    with pytest.raises(BnfixError, match="alpha per"):
        convert(torchvision.models.resnet18(), per="pixel")  # type: ignore[arg-type]

    class OwnForward(nn.BatchNorm2d):  # a BN whose forward ABRi cannot know
        def forward(self, x):
            return torch.relu(super().forward(x))

    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), OwnForward(4))
    with pytest.raises(BnfixError, match=r"2 is a .*OwnForward, whose forward .* is its own"):
        convert(model)
    assert not abri_blocks(model)  # refused before anything changed
    # Every other kind is converted (tests/test_abri_kinds.py checks each against two BNs).
    head = nn.Sequential(nn.Conv2d(3, 4, 1), nn.SyncBatchNorm(4), nn.Flatten(), nn.BatchNorm1d(4))
    convert(head)
    assert set(abri_blocks(head)) == {"1", "3"}
    assert type(head[3].original) is nn.BatchNorm1d and type(head[3].additional) is nn.BatchNorm1d


@pytest.mark.parametrize("act", [nn.ReLU6, nn.SiLU])
def test_works_inside_models_with_other_activations_and_channels_last(act):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), act(), nn.Conv2d(8, 4, 3))
    ref = copy.deepcopy(model)
    convert(model, alpha=1.0)  # α = 1: exactly the pretrained BN, in both modes
    x = torch.randn(4, 3, 12, 12).to(memory_format=torch.channels_last)
    torch.testing.assert_close(model.train()(x), ref.train()(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.eval()(x), ref.eval()(x), rtol=1e-5, atol=1e-5)
    y = model[1](model[0](x))
    assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_runs_close_to_float32(dtype):
    torch.manual_seed(2)
    model = convert(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()))
    x = torch.randn(4, 3, 10, 10)
    want = model(x)
    with torch.autocast("cpu", dtype=dtype):
        got = model(x)
        got.sum().backward()  # the backward runs under autocast too
    assert got.dtype in (dtype, torch.float32)
    assert model[1].alpha.grad is not None and model[1].alpha.grad.dtype == torch.float32
    torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.05)


def test_torch_compile_matches_eager():
    torch.manual_seed(3)
    model = convert(
        nn.Sequential(
            nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3),
            nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        ),
        per="channel",
    )  # fmt: skip
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager")
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(compiled(x), ref(x), rtol=1e-4, atol=1e-4)
    for (n, a), (_, b) in zip(model.named_buffers(), ref.named_buffers(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)


def ddp_lockstep(rank: int, out_file: str) -> None:
    """Two DDP steps on ABRi blocks, each rank its own data: the ranks' parameters must agree.

    Runs inside an initialised 2-process gloo group: tests/test_abri_kinds.py calls it from its
    SyncBatchNorm run, so that one pair of processes (a torch import each) serves both checks.
    """
    import torch.distributed as dist

    torch.manual_seed(0)  # same initial weights on every rank
    model = convert(
        nn.Sequential(
            nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3),
            nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        ),
        per="channel",
    )  # fmt: skip
    ddp = nn.parallel.DistributedDataParallel(model)  # every ABRi parameter must get a gradient
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    for _ in range(2):
        loss = ddp(torch.randn(4, 3, 12, 12, generator=gen)).logsumexp(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    if rank == 0:
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, out_file)
    dist.barrier()
    other = torch.load(out_file)
    if rank == 1:  # parameters agree across ranks after all-reduced steps
        for k, v in model.named_parameters():
            assert torch.allclose(v, other[k], atol=1e-6), k
        torch.save({"ok": True}, out_file + ".ok")
