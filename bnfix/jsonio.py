"""JSON that every parser reads: Python's ``json`` writes ``NaN`` and ``Infinity`` by default,
which strict parsers (JavaScript's ``JSON.parse``, jq, most languages' standard libraries)
reject. An undefined number is written as ``null`` instead."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any


def finite_or_none(obj: Any) -> Any:
    """``obj`` with every NaN/±Inf float (at any depth) replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_or_none(v) for v in obj]
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` of :func:`finite_or_none` of ``obj``; never emits NaN or Infinity."""
    return json.dumps(finite_or_none(obj), allow_nan=False, **kwargs)
