"""Suite-wide settings.

Under pytest-xdist (``scripts/test.sh`` runs the suite on one worker per core) each worker and the
subprocesses it starts compute on one thread: two workers with torch's default of one thread per
core would ask a 2-core machine for four, and the bundle CLI tests, which mostly wait on imports,
would gain nothing from the second core. Tests that compare thread counts set them explicitly.
"""

import os

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
