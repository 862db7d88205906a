"""Helpers shared by the tests: the CLI run as a subprocess, as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BNFIX = str(Path(sys.executable).with_name("bnfix"))


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str


def run_cli(*args: str | Path, cwd: Path | None = None, timeout: float = 900) -> Run:
    """Run the installed ``bnfix`` console script for real."""
    done = subprocess.run(
        [BNFIX, *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200", "BNFIX_DEBUG": "0"},
    )
    return Run(done.returncode, done.stdout, done.stderr)


def run_inprocess(*args: str | Path) -> Run:
    """The same CLI entry point in this process: for the many bad-input cases, without paying
    a torch import per case. Output goes through the real ``main`` (exit codes, one-line errors).
    """
    import contextlib
    import io

    from bnfix.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "200"  # as run_cli: one report line is one line (xdist sets 80)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main([str(a) for a in args])
            except SystemExit as exc:
                code = int(exc.code or 0)
    finally:
        if columns is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = columns
    return Run(code, out.getvalue(), err.getvalue())


def one_error_line(stderr: str) -> str:
    """The CLI's contract for bad input: exactly one line, ``bnfix: error: ...``, no traceback."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("bnfix: error: ") and "Traceback" not in stderr
    return lines[0]


TINY = "bnfix.fusion.synthetic:tiny_cnn"

# The small fusion-tune run the tests start from: tiny models on 16-bin fbanks and 16-pixel
# frames, one epoch a stage. A test states only what it changes (fusion_toml).
SMALL_RUN: dict[str, dict[str, Any]] = {
    "data.audio": {"mel_bins": 16, "target_frames": 32},
    "data.visual": {"frames": 2, "size": 16},
    "model": {"audio_arch": TINY, "visual_arch": TINY},
    "stage1": {"epochs": 1, "batch_size": 8, "lr": 0.05},
    "stage2": {"epochs": 1, "batch_size": 8, "lr": 0.02},
    "mask": {"audio_patch": [8, 8], "visual_patch": [8, 8]},
    "run": {"out_dir": "out"},
}


def fusion_toml(manifest: Path, changes: Mapping[str, Mapping[str, Any] | None] = {}) -> str:
    """:data:`SMALL_RUN` on ``manifest`` as config text, with ``changes`` merged per section
    (new sections are added; a section or key set to None is left out)."""
    from bnfix.fusion.config import toml_text

    sections: dict[str, dict[str, Any]] = {}
    for name in {"data": None, **SMALL_RUN, **changes}:
        if name in changes and changes[name] is None:
            continue
        merged = {**SMALL_RUN.get(name, {}), **(changes.get(name) or {})}
        if name == "data":
            merged = {"manifest": manifest, **merged}
        sections[name] = {key: value for key, value in merged.items() if value is not None}
    return toml_text(sections)
