"""One torch thread per test process: pytest-xdist runs one worker per core, and two OpenMP
threads per tiny op on a shared core make the suite many times slower."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
