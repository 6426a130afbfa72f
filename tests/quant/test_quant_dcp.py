"""torch.distributed.checkpoint on a quantized model (one process): the state_dict keys name
attributes, so get_state_dict / set_state_dict and dcp.save / dcp.load work, grid check included."""

import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

import metaste


def _model(bits=2, seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    return metaste.quantize_model(net, bits=bits, keep_last=False)


def _step(model, opt):
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def test_the_grid_entry_is_an_attribute_of_its_quantizer():
    model = _model()
    sd = model.state_dict()
    assert torch.equal(model.get_submodule("0.weight_quant").grid, sd["0.weight_quant.grid"])


def test_get_and_set_state_dict_round_trip_through_dcp(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _step(model, opt)
    msd, osd = get_state_dict(model, opt)
    assert "0.weight_quant.grid" in msd and "0.weight_quant.s" in msd
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "assuming ... a single process"
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp_path))
    other = _model(seed=1)
    other_opt = torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9)
    _step(other, other_opt)
    m2, o2 = get_state_dict(other, other_opt)
    state = {"model": m2, "optim": o2}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=str(tmp_path))
    set_state_dict(other, other_opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    for (k, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), k
    torch.manual_seed(5)
    _step(model, opt)
    torch.manual_seed(5)
    _step(other, other_opt)  # ... and the next step matches too
    for a, b in zip(model.parameters(), other.parameters()):
        torch.testing.assert_close(a, b)


def test_set_state_dict_still_refuses_another_grid():
    model, other = _model(bits=2), _model(bits=3)
    opt, other_opt = (torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (model, other))
    _step(model, opt), _step(other, other_opt)
    msd, osd = get_state_dict(model, opt)
    with pytest.raises(ValueError, match="saved with the grid"):
        set_state_dict(other, other_opt, model_state_dict=msd, optim_state_dict=osd)
