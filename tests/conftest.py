"""Shared fixtures: the real default checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

from bnfix.default_checkpoint import fetch


@pytest.fixture(scope="session")
def mobilenet_v2_path() -> Path:
    """torchvision's real ImageNet MobileNetV2 weights (fetched once by ``make install``)."""
    return fetch()
