"""Helpers shared by the tests: the CLI run as a subprocess, as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

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
