"""What the torch.distributed tests share: 2 gloo CPU ranks that always finish.

``spawn_ranks(fn, *args)`` runs ``fn(rank, *args)`` in each rank of a gloo group on localhost and
tears the group down in the one order that cannot hang. Torch 2.13 deadlocks when the last
reference to a gloo process group dies inside a DDP ``Reducer`` destructor (the destructor joins
the group's worker thread while holding the GIL, and that thread waits for the GIL to free the
last all-reduce's tensors). So ``fn`` returns first (its DDP wrapper dies while the group is still
registered), a barrier drains the group's queue, and only then is the group destroyed. A rank that
still hangs fails the test after ``timeout`` seconds instead of stalling CI.
"""

from __future__ import annotations

import gc
import os
import socket
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, fn: Callable, port: int, world_size: int, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # the ranks share the CPU
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    fn(rank, *args)  # everything fn built (a DDP wrapper, an optimizer) is freed on return
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def spawn_ranks(fn: Callable, *args, world_size: int = 2, timeout: float = 300.0) -> None:
    """Run ``fn(rank, *args)`` on ``world_size`` gloo ranks; raise if a rank fails or hangs."""
    ctx = mp.spawn(_rank_main, args=(fn, free_port(), world_size, args), nprocs=world_size, join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"a gloo rank of {fn.__name__} did not finish within {timeout:.0f} s")
