"""bnfix: find and repair dead BatchNorm channels in pretrained CNN checkpoints."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("bnfix")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
