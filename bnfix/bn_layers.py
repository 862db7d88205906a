"""BatchNorm layers found from a state dict's keys alone, so a static scan needs no model."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

BN_FIELDS = ("weight", "bias", "running_mean", "running_var")


@dataclass(frozen=True)
class BNParams:
    """One BatchNorm layer's stored tensors (float64 copies: the masks compare tiny numbers)."""

    name: str
    weight: torch.Tensor
    bias: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor

    @property
    def channels(self) -> int:
        return self.weight.numel()


def find_bn_layers(state_dict: Mapping[str, torch.Tensor]) -> list[BNParams]:
    """Every module whose keys are ``weight, bias, running_mean, running_var`` of one length.

    The order is the state dict's, which is the module order for anything saved by torch.
    LayerNorm/GroupNorm have no running statistics and are therefore not matched.
    """
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        prefix, _, leaf = key.rpartition(".")
        if leaf in BN_FIELDS:
            groups.setdefault(prefix, {})[leaf] = tensor
    layers = []
    for name, fields in groups.items():
        if len(fields) != len(BN_FIELDS):
            continue
        if any(t.dim() != 1 for t in fields.values()):
            continue
        if len({t.numel() for t in fields.values()}) != 1:
            continue
        layers.append(BNParams(name, *(fields[f].detach().double().cpu() for f in BN_FIELDS)))
    return layers
