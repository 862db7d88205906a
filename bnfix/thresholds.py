"""The tolerances behind every scan verdict, in a module without torch: the CLI needs the
defaults to build its options, and ``bnfix --help`` should not pay for importing torch."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from bnfix.errors import BnfixError


@dataclass(frozen=True)
class Thresholds:
    """The tolerances behind every verdict; the CLI exposes each as an option."""

    abs_tol: float = 1e-5  # |γ|, |β| below this are abnormally small
    rel_tol: float = 1e-3  # ... or below this fraction of the layer's median |γ|, |β|
    var_tol: float = 1e-6  # stored running variance below this: a collapsed channel
    dead_fraction: float = 0.95  # a probe channel ≤ 0 on at least this share of samples is dead

    def __post_init__(self) -> None:
        # NaN compares false with everything: a NaN tolerance would switch its test off.
        for f in fields(self):
            value = getattr(self, f.name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise BnfixError(f"threshold {f.name} must be a finite number ≥ 0, not {value!r}")
        if self.dead_fraction > 1:
            raise BnfixError(f"dead_fraction is a share of samples, ≤ 1, not {self.dead_fraction}")
