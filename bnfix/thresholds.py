"""The tolerances behind every scan verdict, in a module without torch: the CLI needs the
defaults to build its options, and ``bnfix --help`` should not pay for importing torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Thresholds:
    """The tolerances behind every verdict; the CLI exposes each as an option."""

    abs_tol: float = 1e-5  # |γ|, |β| below this are abnormally small
    rel_tol: float = 1e-3  # ... or below this fraction of the layer's median |γ|, |β|
    var_tol: float = 1e-6  # stored running variance below this: a collapsed channel
    dead_fraction: float = 0.95  # a probe channel ≤ 0 on at least this share of samples is dead
