"""Regressions in ABRi, each checked on real torch modules against float64 references.

* Eval outputs follow the weights however they are written: through ``p.data`` (EMA /
  mean-teacher updates), ``vector_to_parameters``, ``load_state_dict``, optimizer steps,
  in-place writes under ``torch.no_grad()``, replaced tensors. (An eval cache keyed on tensor
  identity and ``_version`` served stale folded parameters after ``.data`` writes.)
* ``convert`` on an already converted model leaves it alone. (It wrapped the blocks' inner
  BNs again and the next forward raised ``AttributeError``.)
* A training forward that raises changes no running statistic and no batch count. (The twin's
  running statistics were rewritten before the normalisation, and the ``momentum=None`` path
  accepted a batch of one value per channel, writing NaN into the running variance.)
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
import torchvision
from test_abri import RefBN, assert_scaled_close, pretrained_bn
from torch import nn

from bnfix.abri import ABRiBatchNorm2d, abri_blocks, convert, fold
from bnfix.errors import BnfixError


class TwoBN(nn.Module):
    """The paper's block as written, ``α·BN_pre(x) + (1 − α)·BN_new(x)``, over a block's BNs."""

    def __init__(self, block: ABRiBatchNorm2d) -> None:
        super().__init__()
        self.pre, self.new, self.alpha = block.original, block.additional, block.alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.alpha.view(1, -1, 1, 1)
        return a * self.pre(x) + (1 - a) * self.new(x)


def two_bn_float64(model: nn.Module) -> nn.Module:
    """A float64 copy of ``model`` with every ABRi block written out as two BatchNorms."""
    ref = copy.deepcopy(model).double()
    for name, block in abri_blocks(ref).items():
        parent, _, leaf = name.rpartition(".")
        setattr(ref.get_submodule(parent), leaf, TwoBN(block))
    return ref


def abri_resnet18(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return convert(torchvision.models.resnet18(num_classes=10), alpha=0.5, per="channel")


def train_steps(model: nn.Module, steps: int, lr: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(torch.randn(4, 3, 32, 32, generator=gen)).logsumexp(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


# --- eval outputs follow the weights ----------------------------------------------------------


def test_mean_teacher_eval_follows_ema_written_through_data():
    """The mean-teacher update writes through ``.data``; the teacher must evaluate its weights."""
    student = abri_resnet18(seed=0)
    teacher = copy.deepcopy(student).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        teacher(x)  # an eval forward before the update (a cache would be filled here)
    train_steps(student, steps=3, lr=0.5, seed=1)
    for _ in range(3):
        for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
            t.data.mul_(0.99).add_(s.data, alpha=0.01)
        for t, s in zip(teacher.buffers(), student.buffers(), strict=True):
            t.data.copy_(s.data)
        with torch.inference_mode():
            got = teacher(x)
            want = two_bn_float64(teacher).eval()(x.double())
            folded = fold(copy.deepcopy(teacher))(x)
        assert_scaled_close(got, want, 1e-5)
        assert_scaled_close(folded, want, 1e-5)


def test_vector_to_parameters_and_module_to_reach_eval():
    model = abri_resnet18(seed=2).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        model(x)
        vec = nn.utils.parameters_to_vector(model.parameters())
        noise = torch.randn(vec.shape, generator=torch.Generator().manual_seed(7))
        nn.utils.vector_to_parameters(vec + 0.05 * noise, model.parameters())
        assert_scaled_close(model(x), two_bn_float64(model).eval()(x.double()), 1e-5)
        model.double()  # replaces every tensor's data in place: same objects, same versions
        assert_scaled_close(model(x.double()), two_bn_float64(model).eval()(x.double()), 1e-12)


def _block_reference(block: ABRiBatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """The block in eval mode, in float64 from its tensors as they are now (two BNs and α)."""
    pre, new = block.original, block.additional
    a = block.alpha.detach().double().view(1, -1, 1, 1)
    one = RefBN(pre.weight, pre.bias, pre.running_mean, pre.running_var, 0, pre.eps, 0.1)
    two = RefBN(new.weight, new.bias, new.running_mean, new.running_var, 0, new.eps, 0.1)
    return a * one(x.double(), False) + (1 - a) * two(x.double(), False)


def _eval_step(block: ABRiBatchNorm2d) -> None:
    """An optimizer step with the block in eval mode (frozen-BN fine-tuning)."""
    opt = torch.optim.SGD(block.parameters(), lr=0.5)
    block(torch.randn(3, 4, 5, 5)).pow(2).mean().backward()
    opt.step()


def _vector(block: ABRiBatchNorm2d) -> None:
    vec = nn.utils.parameters_to_vector(block.parameters())
    nn.utils.vector_to_parameters(vec * 1.5 + 0.1, block.parameters())


def _load(block: ABRiBatchNorm2d, assign: bool) -> None:
    state = {k: v.clone() for k, v in block.state_dict().items()}
    state["original.bias"] += 3.0
    state["additional.running_mean"] -= 0.5
    block.load_state_dict(state, assign=assign)


def _no_grad(block: ABRiBatchNorm2d) -> None:
    with torch.no_grad():
        block.alpha.mul_(0.5)
        block.additional.running_var.add_(1.0)


def _inference_mode(block: ABRiBatchNorm2d) -> None:
    with torch.inference_mode():
        block.original.weight.add_(0.25)


WRITES: dict[str, Callable[[ABRiBatchNorm2d], None]] = {
    # a new tensor object with its own version counter: the parameter's counter does not move
    "param.data in place": lambda b: b.original.weight.data.mul_(-0.5),
    "alpha.data in place": lambda b: b.alpha.data.fill_(0.8),
    "buffer.data in place": lambda b: b.additional.running_var.data.add_(2.0),
    # set_data: same object, same version, new storage
    "param.data = tensor": lambda b: setattr(b.original.bias, "data", torch.randn(4)),
    "vector_to_parameters": _vector,
    "load_state_dict": lambda b: _load(b, assign=False),
    "load_state_dict(assign=True)": lambda b: _load(b, assign=True),
    "optimizer step in eval mode": _eval_step,
    "in place under no_grad": _no_grad,
    "in place under inference_mode": _inference_mode,
    "replaced parameter": lambda b: setattr(b, "alpha", nn.Parameter(torch.full((4,), 0.9))),
    "training forward": lambda b: b.train()(torch.randn(3, 4, 5, 5) * 2 + 1),
}


@pytest.mark.parametrize("write", list(WRITES))
def test_eval_follows_every_way_of_writing_the_tensors(write):
    block = ABRiBatchNorm2d.from_batchnorm(pretrained_bn(4, 0.1, seed=6), per="channel").eval()
    with torch.no_grad():
        block.additional.running_mean.uniform_(-1, 1)
        block.additional.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        before = block(x)
        assert_scaled_close(before, _block_reference(block, x), 1e-6)
    WRITES[write](block)
    block.eval()
    want = _block_reference(block, x)
    assert float((want.detach() - before.double()).abs().max()) > 1e-3  # the map changed
    with torch.no_grad():
        assert_scaled_close(block(x), want, 1e-6)
    with torch.inference_mode():
        assert_scaled_close(block(x), want, 1e-6)
    assert_scaled_close(block(x), want, 1e-6)  # with autograd recording


def test_eval_forward_is_one_batch_norm_over_the_pretrained_statistics():
    """No state is kept between eval forwards: the folded parameters are recomputed each time."""
    block = ABRiBatchNorm2d.from_batchnorm(pretrained_bn(4, 0.1, seed=9)).eval()
    with torch.no_grad():
        block(torch.randn(2, 4, 3, 3))
    assert set(vars(block)) == set(vars(ABRiBatchNorm2d.from_batchnorm(nn.BatchNorm2d(4))))


# --- convert twice ----------------------------------------------------------------------------


def test_convert_twice_leaves_the_model_unchanged():
    model = abri_resnet18(seed=3)
    train_steps(model, steps=1, lr=0.1, seed=4)  # values away from their init
    model.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    blocks = abri_blocks(model)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        before = model(x)
    for kwargs in ({}, {"alpha": 0.9, "per": "layer"}, {"only": ["bn1", "layer1.0.bn2"]}):
        assert convert(model, **kwargs) is model
        after = model.state_dict()
        assert list(after) == list(state)
        for k, v in state.items():
            assert torch.equal(after[k], v), k
        assert abri_blocks(model) == blocks  # the very same block objects
        for block in blocks.values():
            assert type(block.original) is nn.BatchNorm2d
            assert type(block.additional) is nn.BatchNorm2d
        with torch.no_grad():
            assert torch.equal(model(x), before)
    train_steps(model, steps=1, lr=0.1, seed=5)  # and it still trains
    assert_scaled_close(model.eval()(x), two_bn_float64(model).eval()(x.double()), 1e-5)


def test_convert_converts_what_is_left_and_refuses_bns_inside_blocks():
    model = torchvision.models.resnet18(num_classes=3)
    convert(model, only=["bn1"])
    convert(model, per="channel")  # the rest, bn1 untouched
    blocks = abri_blocks(model)
    assert len(blocks) == 20 and blocks["bn1"].per == "layer"
    assert blocks["layer1.0.bn1"].per == "channel"
    with pytest.raises(BnfixError, match=r"bn1\.original is inside an ABRi block"):
        convert(model, only=["bn1.original"])
    with pytest.raises(BnfixError, match=r"no BatchNorm named layer9\.bn"):
        convert(model, only=["layer9.bn"])


# --- a failed training forward changes nothing ------------------------------------------------


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _assert_same_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    now = module.state_dict()
    for k, v in state.items():
        assert torch.equal(now[k], v), f"{k} changed: {v} -> {now[k]}"


# (pretrained batch count, momentum): momentum 0.1, and cumulative averaging with equal counts
# (one F.batch_norm) and with different counts (torch.native_batch_norm)
PATHS = [(7, 0.1), (0, None), (7, None)]


@pytest.mark.parametrize(("count", "momentum"), PATHS)
@pytest.mark.parametrize("failure", ["one value per channel", "mixed dtype"])
def test_failed_training_forward_updates_nothing(count, momentum, failure):
    c = 4
    bn = pretrained_bn(c, momentum, seed=11)
    bn.num_batches_tracked.fill_(count)
    block = ABRiBatchNorm2d.from_batchnorm(copy.deepcopy(bn), per="channel").train()
    with torch.no_grad():
        block.additional.running_mean.uniform_(-1, 1)  # a twin that has already moved
        block.additional.running_var.uniform_(0.5, 2)
    state = _state(block)
    if failure == "one value per channel":
        bad, error, match = torch.randn(1, c, 1, 1), ValueError, "more than 1 value per channel"
    else:
        bad, error, match = torch.randn(3, c, 2, 2).double(), RuntimeError, "dtype"
    with pytest.raises(error, match=match):
        block(bad)
    _assert_same_state(block, state)
    with pytest.raises(error, match=match):  # a plain BN fails the same way
        bn.train()(bad)

    # The retry is the step the failed call would have been: against two float64 BNs.
    pre, new = block.original, block.additional
    ref_pre = RefBN(pre.weight, pre.bias, pre.running_mean, pre.running_var, count, pre.eps,
                    momentum)  # fmt: skip
    ref_new = RefBN(new.weight, new.bias, new.running_mean, new.running_var, 0, new.eps, momentum)
    x = torch.randn(3, c, 2, 2, generator=torch.Generator().manual_seed(12)) * 2 + 1
    y = block(x)
    a = block.alpha.detach().double().view(1, -1, 1, 1)
    want = a * ref_pre(x.double(), True) + (1 - a) * ref_new(x.double(), True)
    assert_scaled_close(y, want, 1e-5)
    for got, ref in [
        (pre.running_mean, ref_pre.mean),
        (pre.running_var, ref_pre.var),
        (new.running_mean, ref_new.mean),
        (new.running_var, ref_new.var),
    ]:
        assert_scaled_close(got, ref, 1e-6)
    assert int(pre.num_batches_tracked) == count + 1 and int(new.num_batches_tracked) == 1


@pytest.mark.parametrize(("count", "momentum"), PATHS)
def test_out_of_memory_inside_the_kernel_updates_nothing(monkeypatch, count, momentum):
    """An OOM-retry loop: the normalisation kernel raises, the block must not have moved."""
    bn = pretrained_bn(4, momentum, seed=13)
    bn.num_batches_tracked.fill_(count)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), bn, nn.ReLU())
    convert(model, per="channel")
    state = _state(model)

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    with monkeypatch.context() as patch:
        patch.setattr(F, "batch_norm", oom)
        patch.setattr(torch, "native_batch_norm", oom)
        with pytest.raises(torch.OutOfMemoryError):
            model(torch.randn(2, 3, 6, 6))
    _assert_same_state(model, state)


class _Shared(nn.Module):
    """One BatchNorm in two places (``self.bn2 = self.bn``, as siamese and multi-view code
    writes it), run twice per forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.bn = pretrained_bn(6, 0.1, seed=4)
        self.bn2 = self.bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(self.bn(self.conv1(x))))


def test_a_batchnorm_in_two_places_becomes_one_block_in_both_and_folds_in_both() -> None:
    """convert swapped a shared BN at its first name only: the second place still ran the
    pretrained BN alone (the block's own ``original``), ignoring α and the twin — 2.77× off at
    α = 0 — and updated its statistics twice a step; fold then left that place an ABRi block."""
    from bnfix.abri import convert_report

    torch.manual_seed(0)
    model = _Shared()
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    report = convert_report(model, alpha=0.0)
    assert report.aliases == {"bn": ["bn2"]} and "bn = bn2" in report.summary()
    assert isinstance(model.bn, ABRiBatchNorm2d) and model.bn2 is model.bn
    fresh = RefBN(torch.ones(6), torch.zeros(6), torch.zeros(6), torch.ones(6), 0, 1e-5, 0.1)
    c1, c2 = model.conv1, model.conv2
    model.eval()
    with torch.no_grad():
        h = fresh(F.conv2d(x.double(), c1.weight.double(), c1.bias.double(), padding=1), False)
        want = fresh(F.conv2d(h, c2.weight.double(), c2.bias.double(), padding=1), False)
        assert_scaled_close(model(x), want, 1e-5)
    model.train()
    loss = model(x).sum() + model(x * 2).sum()  # two views, then one backward
    loss.backward()
    assert int(model.bn.original.num_batches_tracked) == 7 + 4  # 2 views x 2 places
    assert set(abri_blocks(model)) == {"bn", "bn2"}
    assert convert_report(_Shared(), only=["bn2"]).converted == {"bn": "BatchNorm2d"}

    model.eval()
    with torch.no_grad():
        before = model(x)
    fold(model)
    assert type(model.bn) is nn.BatchNorm2d and model.bn2 is model.bn
    assert abri_blocks(model) == {}
    with torch.no_grad():
        assert_scaled_close(model(x), before, 1e-6)
