"""HyperSTE under DDP (gloo, 2 CPU processes): θ identical on every rank and equal to a
single-process run on the concatenated batch (docs/design.md §3.1)."""

from __future__ import annotations

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

import metaste
from metaste import HyperSTE
from tests.helpers.ddp import spawn_ranks
from tests.helpers.hyperste import batches, loss_fn, quantized_mlp

STEPS = 4


def _run(model, method, data):
    opt = HyperSTE(torch.optim.SGD(model.parameters(), lr=0.2), method=method, hyper_lr=0.05)
    for x, y in data:
        opt.step(lambda x=x, y=y: loss_fn(model, x, y))


def _worker(rank, method, path):
    model = quantized_mlp(dtype=torch.float64)
    ddp = DistributedDataParallel(model)
    data = [(x.chunk(2)[rank], y.chunk(2)[rank]) for x, y in batches(STEPS, size=32, dtype=torch.float64)]
    _run(ddp, method, data)
    torch.save([t for _, t in metaste.surrogate_parameters(model)], f"{path}.{rank}")


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("method", ["analytical", "delayed"])
def test_ddp_surrogates_agree_across_ranks_and_with_one_process_on_the_whole_batch(method, tmp_path):
    path = str(tmp_path / "a")
    spawn_ranks(_worker, method, path)
    a0, a1 = (torch.load(f"{path}.{r}") for r in (0, 1))
    for t0, t1 in zip(a0, a1):
        assert torch.equal(t0, t1)
    model = quantized_mlp(dtype=torch.float64)
    _run(model, method, batches(STEPS, size=32, dtype=torch.float64))
    ref = [t for _, t in metaste.surrogate_parameters(model)]
    assert not all(torch.equal(t, torch.ones_like(t)) for t in ref)
    for t, r in zip(a0, ref):
        torch.testing.assert_close(t, r, rtol=1e-9, atol=1e-12)
