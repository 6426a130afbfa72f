"""Shared by the wrapper tests: a wrapper that must equal its bare base optimizer step for step, and
two wrappers (one resumed from the other's checkpoint) that must train alike."""

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


def assert_twins(net, opt, net2, opt2, batches) -> None:
    """Train ``net`` with ``opt`` and ``net2`` with ``opt2`` (a wrapper resumed from ``opt``'s
    checkpoint) on the same ``batches``; every parameter must end bitwise equal."""
    for x, y in batches:
        opt.step(lambda x=x, y=y: F.cross_entropy(net(x), y))
        opt2.step(lambda x=x, y=y: F.cross_entropy(net2(x), y))
    for p, q in zip(net.parameters(), net2.parameters()):
        assert torch.equal(p, q)
