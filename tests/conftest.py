"""One torch thread per test process: pytest-xdist runs one worker per core, and two OpenMP
threads per tiny op on a shared core make the suite many times slower.

The compiled element-wise passes (:mod:`metaste._compile`) run only in the tests marked
``compiled``, which check them bit for bit against their eager twins; every other test runs the
eager twins (the same values), so a cold ``torch.compile`` cache costs seconds, not minutes."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import metaste._compile  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _eager_passes_unless_compiled(request, monkeypatch):
    if request.node.get_closest_marker("compiled") is None:
        monkeypatch.setattr(metaste._compile, "ENABLED", False)
        monkeypatch.setenv("METASTE_FUSED", "0")  # and in the processes a test spawns
