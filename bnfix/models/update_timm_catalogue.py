"""Rewrite (or, with ``--check``, verify) ``bnfix/models/timm_catalogue.py`` for the installed
timm and torchvision: ``python -m bnfix.models.update_timm_catalogue [--check]``. It builds
every BatchNorm model of the catalogued timm families on the meta device (minutes)."""

from __future__ import annotations

import sys
from pathlib import Path

from bnfix.models.timm_zoo import check_catalogue, write_catalogue


def main(argv: list[str]) -> int:
    if argv == ["--check"]:
        found = check_catalogue()
        print("\n".join(found) or "the catalogue is current")
        return 1 if found else 0
    if argv:
        print("usage: python -m bnfix.models.update_timm_catalogue [--check]", file=sys.stderr)
        return 2
    write_catalogue(str(Path(__file__).with_name("timm_catalogue.py")))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
