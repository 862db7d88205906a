"""The built-in default checkpoint: verified by sha256 wherever it comes from."""

from __future__ import annotations

import pytest

from bnfix.default_checkpoint import MOBILENET_V2, fetch
from bnfix.errors import BnfixError


def test_cached_default_is_the_real_torchvision_file(mobilenet_v2_path):
    assert mobilenet_v2_path.name == "mobilenet_v2-b0353104.pth"
    assert mobilenet_v2_path.stat().st_size == 14_212_972


def test_a_local_copy_with_another_hash_is_refused(tmp_path, monkeypatch, mobilenet_v2_path):
    tampered = tmp_path / MOBILENET_V2.filename
    data = bytearray(mobilenet_v2_path.read_bytes())
    data[-100] ^= 0xFF
    tampered.write_bytes(bytes(data))
    monkeypatch.setenv("BNFIX_DEFAULT_CKPT", str(tampered))
    with pytest.raises(BnfixError, match=r"is not mobilenet_v2-b0353104\.pth's"):
        fetch()
    good = tmp_path / "copy.pth"
    good.write_bytes(mobilenet_v2_path.read_bytes())
    monkeypatch.setenv("BNFIX_DEFAULT_CKPT", str(good))
    assert fetch() == good
