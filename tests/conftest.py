"""Suite-wide settings.

Under pytest-xdist (``scripts/test.sh`` runs the suite on one worker per core) each worker and the
subprocesses it starts compute on one thread: two workers with torch's default of one thread per
core would ask a 2-core machine for four, and the bundle CLI tests, which mostly wait on imports,
would gain nothing from the second core. Tests that compare thread counts set them explicitly.
"""

import os
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from .threads import torch_threads

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _threads_of_the_marker(request: pytest.FixtureRequest):
    """Run a test marked ``@pytest.mark.threads(n)`` on ``n`` threads (its published figures were measured so)."""
    marker = request.node.get_closest_marker("threads")
    if marker is None:
        yield
        return
    with torch_threads(marker.args[0]):
        yield


@pytest.hookimpl(trylast=True)  # after pytest has ordered the tests by their fixtures
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """On an xdist worker, order the files by how many slow tests they hold, most first.

    ``scripts/test.sh`` hands out whole files (``--dist loadfile``) in this order
    (``--no-loadscope-reorder``): the long files start first and the short ones fill the gaps, so
    both workers finish together instead of one running a long file alone at the end. A file marked
    ``waits_for_setup`` (MONAI Label's, whose venv ``scripts/test.sh`` makes beside the suite) comes
    after the files with slow tests and before the rest.
    """
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    files: dict[Path, list[pytest.Item]] = defaultdict(list)
    for item in items:
        files[item.path].append(item)
    slow = {path: sum(test.get_closest_marker("slow") is not None for test in tests) for path, tests in files.items()}
    for path, tests in files.items():
        if any(test.get_closest_marker("waits_for_setup") for test in tests):
            slow[path] = 0.5  # after every file with slow tests: its set-up, beside the suite, has time to end
    items[:] = [item for path in sorted(files, key=lambda path: -slow[path]) for item in files[path]]
