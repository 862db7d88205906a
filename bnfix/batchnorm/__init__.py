"""BatchNorm kinds and ABRi, one subpackage.

* :mod:`bnfix.batchnorm.kinds` — which BatchNorm classes ABRi takes (BatchNorm1d/2d/3d,
  SyncBatchNorm, timm's BatchNormAct2d/SyncBatchNormAct), how each normalises and what it runs
  afterwards, which layers are skipped and why, which are refused.
* :mod:`bnfix.batchnorm.abri` — the ABRi block (:class:`ABRiBatchNorm`, also importable as
  ``ABRiBatchNorm2d``) and the maths of one normalisation pass and of the fold.
* :mod:`bnfix.batchnorm.convert` — :func:`convert`, :func:`convert_report`, :func:`fold`.

``bnfix.abri`` re-exports all of it under its historical names.
"""

from bnfix.batchnorm.abri import (
    PER_CHOICES,
    ABRiBatchNorm,
    ABRiBatchNorm2d,
    Per,
    check_alpha,
    folded_parameters,
    mix,
    mixed_statistics,
)
from bnfix.batchnorm.convert import (
    ConvertReport,
    abri_blocks,
    convert,
    convert_report,
    fold,
    fold_block,
)
from bnfix.batchnorm.kinds import Kind, kind_of

__all__ = [
    "PER_CHOICES",
    "ABRiBatchNorm",
    "ABRiBatchNorm2d",
    "ConvertReport",
    "Kind",
    "Per",
    "abri_blocks",
    "check_alpha",
    "convert",
    "convert_report",
    "fold",
    "fold_block",
    "folded_parameters",
    "kind_of",
    "mix",
    "mixed_statistics",
]
