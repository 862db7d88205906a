"""BatchNorm layers found from a state dict's keys alone, so a static scan needs no model.

An ABRi block counts as one layer, named by its module path, with the parameters it acts with
in training (γ_eff, β_eff) and its mixed running statistics: what it does, not how it is stored.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from bnfix.abri import mix, mixed_statistics
from bnfix.abri_keys import ADDITIONAL, ALPHA, ORIGINAL, abri_prefixes

BN_FIELDS = ("weight", "bias", "running_mean", "running_var")
BATCH_COUNTER = "num_batches_tracked"


@dataclass(frozen=True)
class BNParams:
    """One BatchNorm layer's stored tensors (float64 copies: the masks compare tiny numbers)."""

    name: str
    weight: torch.Tensor
    bias: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor
    batches_tracked: int | None = None  # num_batches_tracked, when the checkpoint has it

    @property
    def channels(self) -> int:
        return self.weight.numel()


def find_bn_layers(state_dict: Mapping[str, torch.Tensor]) -> list[BNParams]:
    """Every module whose keys are ``weight, bias, running_mean, running_var`` of one length.

    The order is the state dict's, which is the module order for anything saved by torch.
    LayerNorm/GroupNorm have no running statistics and are therefore not matched.
    """
    groups: dict[str, dict[str, torch.Tensor]] = {}
    counters: dict[str, int] = {}
    for key, tensor in state_dict.items():
        prefix, _, leaf = key.rpartition(".")
        if leaf in BN_FIELDS:
            groups.setdefault(prefix, {})[leaf] = tensor
        elif leaf == BATCH_COUNTER and tensor.numel() == 1:
            counters[prefix] = int(tensor)
    layers = []
    for name, fields in groups.items():
        if len(fields) != len(BN_FIELDS):
            continue
        if any(t.dim() != 1 for t in fields.values()):
            continue
        if len({t.numel() for t in fields.values()}) != 1:
            continue
        tensors = (fields[f].detach().double().cpu() for f in BN_FIELDS)
        layers.append(BNParams(name, *tensors, batches_tracked=counters.get(name)))
    return _merge_abri(state_dict, layers)


def _merge_abri(state_dict: Mapping[str, torch.Tensor], layers: list[BNParams]) -> list[BNParams]:
    blocks = set(abri_prefixes(state_dict))
    if not blocks:
        return layers
    by_name = {layer.name: layer for layer in layers}
    merged = []
    for layer in layers:
        block, _, part = layer.name.rpartition(".")
        if block not in blocks:
            merged.append(layer)
        elif part == ORIGINAL and f"{block}.{ADDITIONAL}" in by_name:
            merged.append(_effective(block, layer, by_name[f"{block}.{ADDITIONAL}"], state_dict))
    return merged


def _effective(
    name: str, pre: BNParams, new: BNParams, state_dict: Mapping[str, torch.Tensor]
) -> BNParams:
    alpha = state_dict[f"{name}.{ALPHA}"].detach().double().cpu()
    mean, var = mixed_statistics(
        alpha, pre.running_mean, pre.running_var, new.running_mean, new.running_var
    )
    weight, bias = mix(alpha, pre.weight, new.weight), mix(alpha, pre.bias, new.bias)
    weight, bias = weight.expand_as(pre.weight), bias.expand_as(pre.bias)
    return BNParams(name, weight, bias, mean, var, batches_tracked=pre.batches_tracked)
