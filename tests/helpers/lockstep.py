"""Shared by the wrapper tests: a wrapper that must equal its bare base optimizer step for step."""

import torch
import torch.nn.functional as F


def assert_lockstep(ref, base, net, opt, batches) -> None:
    """Train ``ref`` with the bare optimizer ``base`` (zero_grad / backward / step) and ``net`` with
    the wrapper ``opt`` on the same ``batches``; every parameter must end bitwise equal."""
    for x, y in batches:
        base.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        base.step()
        opt.step(lambda x=x, y=y: F.cross_entropy(net(x), y))
    for p, q in zip(ref.parameters(), net.parameters()):
        assert torch.equal(p, q)
