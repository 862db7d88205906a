"""Adaptive BatchNorm Re-initialisation (ABRi): the historical import path.

Everything lives in :mod:`bnfix.batchnorm` now (the block for every BatchNorm kind in
:mod:`bnfix.batchnorm.abri`, the kinds in :mod:`bnfix.batchnorm.kinds`, ``convert``/``fold`` in
:mod:`bnfix.batchnorm.convert`); this module re-exports the same public names, so
``from bnfix.abri import ABRiBatchNorm2d, convert, fold`` keeps working.
"""

from __future__ import annotations

from bnfix.batchnorm.abri import (
    PER_CHOICES,
    ABRiBatchNorm,
    ABRiBatchNorm2d,
    Per,
    check_alpha,
    check_batch_size,
    check_per,
    folded_parameters,
    mix,
    mixed_statistics,
    update_factor,
)
from bnfix.batchnorm.convert import (
    ConvertReport,
    abri_blocks,
    convert,
    convert_report,
    fold,
    fold_block,
)

__all__ = [
    "PER_CHOICES",
    "ABRiBatchNorm",
    "ABRiBatchNorm2d",
    "ConvertReport",
    "Per",
    "abri_blocks",
    "check_alpha",
    "check_batch_size",
    "check_per",
    "convert",
    "convert_report",
    "fold",
    "fold_block",
    "folded_parameters",
    "mix",
    "mixed_statistics",
    "update_factor",
]
