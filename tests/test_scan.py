"""Scan on real torchvision models with planted bad channels: reported exactly, no more or less."""

from __future__ import annotations

import random
import re
import zlib

import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from bnfix.bn_layers import find_bn_layers
from bnfix.checkpoint import Checkpoint
from bnfix.masks import Thresholds, abnormal_mask, always_dead_mask, collapsed_mask
from bnfix.probe_stats import _Accumulator, batch_statistics_mode, collect
from bnfix.scan import scan_probe, scan_static

ARCHS = ["resnet18", "mobilenet_v2", "efficientnet_b0"]


def plant(state: dict[str, torch.Tensor], seed: int) -> dict[str, set[tuple[str, int]]]:
    """Plant each kind of bad channel at random places; return where each kind must be reported.

    - zeroed:   γ = 0, β < 0          → always dead (and dead on any probe), not abnormal
    - tiny_neg: γ, β tiny, β ≪ 0 side → abnormal, always dead, dead on any probe
    - tiny_pos: γ, β tiny, β > 0      → abnormal only (its output is a small positive number)
    - collapsed: running_var = 0      → collapsed only
    """
    rng = random.Random(seed)
    layers = [bn.name for bn in find_bn_layers(state)]
    picks = {kind: set() for kind in ("zeroed", "tiny_neg", "tiny_pos", "collapsed")}
    used: set[tuple[str, int]] = set()
    for kind in picks:
        while len(picks[kind]) < 3:
            name = rng.choice(layers)
            channel = rng.randrange(state[f"{name}.weight"].numel())
            if (name, channel) in used:
                continue
            used.add((name, channel))
            picks[kind].add((name, channel))
            if kind == "zeroed":
                state[f"{name}.weight"][channel] = 0.0
                state[f"{name}.bias"][channel] = -rng.uniform(0.1, 2.0)
            elif kind == "tiny_neg":
                state[f"{name}.weight"][channel] = 1e-8
                state[f"{name}.bias"][channel] = -2e-6
            elif kind == "tiny_pos":
                state[f"{name}.weight"][channel] = 3e-9
                state[f"{name}.bias"][channel] = 4e-6
            else:
                state[f"{name}.running_var"][channel] = 0.0
    return {
        "abnormal": picks["tiny_neg"] | picks["tiny_pos"],
        "always_dead": picks["zeroed"] | picks["tiny_neg"],
        "collapsed": picks["collapsed"],
        "dead": picks["zeroed"] | picks["tiny_neg"],
    }


def depthwise_twins(arch: str, dead: set[tuple[str, int]]) -> set[tuple[str, int]]:
    """Channels a dead channel kills downstream, found by following the architecture.

    In MobileNetV2 an expansion channel that is dead is exactly 0 after ReLU6, so the depthwise
    conv after it (channel k sees only channel k) outputs a constant 0; batch-statistics BN then
    outputs β = 0 for it: dead too. A correct probe must report these, so the test expects them.
    """
    if arch != "mobilenet_v2":
        return set()
    twins = set()
    for name, channel in dead:
        block = re.fullmatch(r"features\.(\d+)\.conv\.0\.1", name)
        if block and int(block.group(1)) >= 2:  # block 1 has no expansion: conv.0 is depthwise
            twins.add((f"features.{block.group(1)}.conv.1.1", channel))
    return twins


def reported(scan, field: str) -> set[tuple[str, int]]:
    return {(layer.name, c) for layer in scan.layers for c in getattr(layer, field)}


@pytest.fixture(scope="module", params=ARCHS)
def planted(request):
    torch.manual_seed(1)
    model = torchvision.models.get_model(request.param, num_classes=10)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    expected = plant(state, seed=zlib.crc32(request.param.encode()))
    expected["dead"] |= depthwise_twins(request.param, expected["dead"])
    model.load_state_dict(state)
    ckpt = Checkpoint(path=f"{request.param}.pt", state_dict=state, sha256="0" * 64, format="x")
    return model.eval(), ckpt, expected


def test_static_scan_reports_exactly_the_planted_channels(planted):
    _, ckpt, expected = planted
    scan = scan_static(ckpt)
    for field in ("abnormal", "always_dead", "collapsed"):
        assert reported(scan, field) == expected[field], field
    assert scan.summary.dead is None and scan.summary.capacity_used is None


def test_probe_scan_reports_exactly_the_planted_dead_channels(planted):
    model, ckpt, expected = planted
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(5)
    batches = list(torch.randn(24, 3, 64, 64, generator=gen).split(8))
    scan = scan_probe(ckpt, model, batches, modality="visual")
    for field in ("abnormal", "always_dead", "collapsed", "dead"):
        assert reported(scan, field) == expected[field], field
    assert scan.probe_samples == 24
    summary = scan.summary
    assert summary.dead == len(expected["dead"])
    assert summary.capacity_used == pytest.approx(1 - len(expected["dead"]) / summary.channels)
    # the probe runs in batch-statistics mode and leaves every stored tensor untouched
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not model.training


def test_abnormal_relative_rule_uses_each_layers_median():
    gamma = torch.tensor([0.5, 0.6, 0.4, 3e-4, 0.5], dtype=torch.float64)
    beta = torch.tensor([0.2, -0.1, 0.3, 5e-5, 1e-4], dtype=torch.float64)
    t = Thresholds()
    # channel 3: both below 1e-3 × median (5e-4 and 1e-4) → abnormal; channel 4 γ is normal
    assert abnormal_mask(gamma, beta, t).tolist() == [False, False, False, True, False]
    assert abnormal_mask(gamma * 1e3, beta * 1e3, t).tolist() == [False] * 3 + [True, False]


def test_always_dead_needs_negligible_gamma_and_negative_beta_with_margin():
    gamma = torch.tensor([0.0, 0.0, 1e-8, 1e-6, 1.0, 0.0], dtype=torch.float64)
    beta = torch.tensor([0.0, -1.0, -1e-6, -1e-9, -5.0, 1e-3], dtype=torch.float64)
    assert always_dead_mask(gamma, beta, Thresholds()).tolist() == [
        True, True, True, False, False, False,
    ]  # fmt: skip
    assert collapsed_mask(torch.tensor([0.0, 1e-7, 1e-5]), Thresholds()).tolist() == [
        True, True, False,
    ]  # fmt: skip


class SubclassedBN(nn.BatchNorm2d):
    """A BN subclass (like timm's BatchNormAct2d): the probe measures its input by a hook."""


@pytest.mark.parametrize("bn_class", [nn.BatchNorm2d, SubclassedBN])
def test_streaming_statistics_match_a_float64_reference(bn_class):
    """Active fractions, dead-sample fractions and pooled mean/variance over uneven batches."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 6, 3), bn_class(6), nn.ReLU(), nn.Conv2d(6, 4, 1),
                          bn_class(4))  # fmt: skip
    with torch.no_grad():
        model[1].bias.copy_(torch.tensor([-1.5, 0.0, 0.4, -0.3, 2.0, -3.0]))
        model[1].weight.copy_(torch.tensor([0.2, 1.0, 1.0, 0.5, 0.1, 1.0]))
    x = torch.randn(23, 2, 9, 7) * 3 + 1
    batches = [x[:10], x[10:17], x[17:]]
    stats = collect(model, batches)
    conv_out = model[0](x).double()
    # reference: batch-statistics BN applied per batch, everything kept in float64
    ys = []
    for b in batches:
        h = model[0](b).double()
        mean, var = h.mean(dim=(0, 2, 3)), h.var(dim=(0, 2, 3), unbiased=False)
        xhat = (h - mean[None, :, None, None]) / (var[None, :, None, None] + 1e-5).sqrt()
        w, bias = model[1].weight.double(), model[1].bias.double()
        ys.append(xhat * w[None, :, None, None] + bias[None, :, None, None])
    y = torch.cat(ys)
    s = stats["1"]
    assert torch.allclose(s.active_fraction, (y > 0).double().mean(dim=(0, 2, 3)), atol=1e-12)
    dead = (y.flatten(2).amax(2) <= 0).double().mean(0)
    assert torch.allclose(s.dead_sample_fraction, dead, atol=1e-12)
    assert torch.allclose(s.input_mean, conv_out.mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    ref_var = conv_out.var(dim=(0, 2, 3), unbiased=False)
    assert torch.allclose(s.input_var, ref_var, rtol=1e-5, atol=1e-6)
    assert s.samples == 23


def test_batch_statistics_mode_restores_the_model():
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Dropout(0.5))
    model.train()
    bn = model[1]
    mean, var = bn.running_mean, bn.running_var
    with batch_statistics_mode(model):
        assert not model[2].training  # dropout off: the probe sees a deterministic network
        out1 = model(torch.ones(2, 1, 5, 5))
        out2 = model(torch.ones(2, 1, 5, 5))
        assert torch.equal(out1, out2)
    assert model.training and bn.running_mean is mean and bn.running_var is var
    assert int(bn.num_batches_tracked) == 0


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 50), min_size=1, max_size=6),
    shift=st.floats(-1e3, 1e3),
    scale=st.floats(1e-3, 1e3),
)
def test_chan_merge_equals_the_pooled_mean_and_variance(sizes, shift, scale):
    """However a probe is split into batches, the pooled statistics are the whole probe's."""
    gen = torch.Generator().manual_seed(len(sizes))
    data = torch.randn(sum(sizes), 3, dtype=torch.float64, generator=gen) * scale + shift
    acc = _Accumulator()
    for part in data.split(sizes):
        acc.add_input(part.mean(0), part.var(0, unbiased=False), part.shape[0])
    assert torch.allclose(acc.mean, data.mean(0), rtol=1e-9, atol=1e-9 * scale)
    want = data.var(0, unbiased=False)
    assert torch.allclose(acc.m2 / acc.elements, want, rtol=1e-7, atol=1e-12 * scale**2)
