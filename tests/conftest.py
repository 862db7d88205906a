"""Shared fixtures: the real default checkpoint; torch threads sized to the pytest workers."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from bnfix.default_checkpoint import fetch


def _threads_per_worker() -> int:
    """The cores each pytest-xdist worker may use (all of them without xdist).

    ``make test`` runs 2 workers on 2 cores: with torch's default of one thread per core each
    worker's OpenMP team waits on the other's (a DenseNet forward took 4 s instead of 0.08 s).
    """
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return max(1, (os.cpu_count() or 1) // max(1, workers))


# Subprocesses (the CLI, the examples, torch.multiprocessing workers) read OMP_NUM_THREADS at
# start. A value the user set wins; one this file set in the xdist controller (which workers
# inherit with its environment) is recomputed in each worker.
_OURS = "_BNFIX_TESTS_SET_OMP"
if "OMP_NUM_THREADS" not in os.environ or os.environ.get(_OURS) == "1":
    os.environ["OMP_NUM_THREADS"] = str(_threads_per_worker())
    os.environ[_OURS] = "1"
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def mobilenet_v2_path() -> Path:
    """torchvision's real ImageNet MobileNetV2 weights (fetched once by ``make install``)."""
    return fetch()


@pytest.fixture(scope="module", autouse=True)
def _module_folders_removed_when_they_passed(request, tmp_path_factory):
    """Remove what a test file's module-scoped fixtures wrote once its tests have passed.

    pyproject's retention policy removes each passing test's own folder; folders made with
    ``tmp_path_factory.mktemp`` live until the session ends, and the fixtures that build
    models, feature stores and videos for a whole file would otherwise pile up (the suite
    wrote 3.6 GB before either rule). A file with a failure keeps everything, to be looked at.
    """
    base = tmp_path_factory.getbasetemp()
    before = set(base.iterdir())
    failed = request.session.testsfailed
    yield
    if request.session.testsfailed == failed:
        for path in set(base.iterdir()) - before:
            shutil.rmtree(path, ignore_errors=True)
