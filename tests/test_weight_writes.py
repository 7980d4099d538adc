"""A block-sparse layer's ``weight`` is a read-only dense copy: writes raise, init goes through the layer
(``init_(fn)``, ``reset_parameters()``)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import freetickets_kernels as ftk


def _layers():
    torch.manual_seed(0)
    return [ftk.SparseLinear(24, 40, density=0.4, block_size=(8, 5)),  # ragged edges both ways
            ftk.SparseConv2d(5, 12, 3, padding=1, density=0.5, block_size=(4, 3))]


WRITES = {
    "nn.init.zeros_": lambda l: nn.init.zeros_(l.weight),
    "nn.init.kaiming_normal_": lambda l: nn.init.kaiming_normal_(l.weight, mode="fan_out", nonlinearity="relu"),
    "nn.init.orthogonal_ (through a view)": lambda l: nn.init.orthogonal_(l.weight),
    ".data.mul_": lambda l: l.weight.data.mul_(0),
    "item assignment": lambda l: l.weight.__setitem__(0, 1.0),
    "in-place add on a view": lambda l: l.weight[0].add_(1),
    "out=": lambda l: (lambda w: torch.add(w, 1, out=w))(l.weight),
}


@pytest.mark.parametrize("write", list(WRITES), ids=list(WRITES))
@pytest.mark.parametrize("index", [0, 1], ids=["linear", "conv2d"])
def test_writes_to_weight_raise_instead_of_doing_nothing(write, index):
    layer = _layers()[index]
    before = layer.values.detach().clone()
    with pytest.raises(RuntimeError, match=r"read-only dense copy.*init_\(fn\)"):
        WRITES[write](layer)
    assert torch.equal(layer.values, before)


@pytest.mark.parametrize("index", [0, 1], ids=["linear", "conv2d"])
def test_assigning_weight_raises_a_clear_error(index):
    layer = _layers()[index]
    with pytest.raises(AttributeError, match=r"cannot assign Sparse\w+\.weight: the trainable parameter is `values`"):
        layer.weight = nn.Parameter(torch.zeros(layer.weight.shape))


def test_reading_weight_still_works_and_gives_plain_tensors():
    layer, conv = _layers()
    x = torch.randn(3, 24)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
    assert type(layer.weight * 2) is torch.Tensor and type(layer.weight.clone()) is torch.Tensor
    w = layer.weight.clone()
    w.zero_()  # a clone is the user's own tensor
    dense = conv.to_dense()
    torch.testing.assert_close(dense.weight.detach(), conv.weight)  # (assert_close refuses Parameter vs a subclass)
    assert torch.equal(conv.weight != 0, conv.mask & (conv.weight != 0))


@pytest.mark.parametrize("index", [0, 1], ids=["linear", "conv2d"])
def test_init_applies_a_torch_init_to_the_dense_view_under_the_mask(index):
    layer = _layers()[index]
    values, mask, slots = layer.values, layer.mask.clone(), layer.slot_map.clone()
    assert layer.init_(nn.init.ones_) is layer
    assert layer.values is values and torch.equal(layer.slot_map, slots)
    assert torch.equal(layer.weight, mask.to(layer.weight.dtype))  # ones exactly under the mask
    assert torch.equal(layer.values != 0, layer.layout.valid_mask())  # the ragged padding stays zero
    new = torch.randn(layer.weight.shape)
    layer.init_(lambda w: w.copy_(new))
    torch.testing.assert_close(layer.weight, new * mask)
    layer.init_(lambda w: torch.full_like(w, 2.0))  # a returned tensor is taken too
    assert torch.equal(layer.weight, 2 * mask.to(layer.weight.dtype))
    with pytest.raises(ValueError, match="shape"):
        layer.init_(lambda w: torch.zeros(3))


def test_the_usual_init_loop_has_a_sparse_equivalent():
    """The loop of torchvision's resnet, written for a model holding dense and sparse convs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 3), nn.ReLU(), nn.Conv2d(64, 64, 3))
    ftk.sparsify(model, density=0.5, block_size=8, distribution="uniform", exclude=["0"])
    assert not isinstance(model[2], nn.Conv2d)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, ftk.SparseConv2d):  # not an nn.Conv2d
            m.init_(lambda w: nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu"))
    std = math.sqrt(2 / (64 * 9))  # fan_out of the dense 64x64x3x3 conv
    live = model[2].values[model[2].layout.valid_mask()]
    assert live.std().item() == pytest.approx(std, rel=0.05)


@pytest.mark.parametrize("index", [0, 1], ids=["linear", "conv2d"])
def test_reset_parameters_follows_torch_default_init_on_the_live_blocks(index):
    layer = _layers()[index]
    values, slots = layer.values, layer.slot_map.clone()
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer.init_(nn.init.zeros_)
    nn.init.zeros_(layer.bias)
    layer.reset_parameters()
    assert layer.values is values and opt.param_groups[0]["params"][0] is values  # the optimizer still holds it
    assert torch.equal(layer.slot_map, slots)
    fan_in = layer.weight[0].numel()  # in_features, or in_channels * kh * kw
    bound = 1 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)), as nn.Linear / nn.Conv2d
    live = layer.values[layer.layout.valid_mask()]
    assert live.abs().max() <= bound and live.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
    assert torch.all(layer.values[~layer.layout.valid_mask()] == 0)
    assert layer.bias.abs().max() <= bound and layer.bias.abs().sum() > 0
    # the same distribution torch's own reset_parameters draws
    dense = layer.to_dense()
    dense.reset_parameters()
    assert dense.weight.abs().max() <= bound and dense.weight.std().item() == pytest.approx(bound / math.sqrt(3),
                                                                                           rel=0.1)
