"""RigL's gradient capture survives in-place ops on a sparse layer's output (and on views of it)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import freetickets_kernels as ftk
from freetickets_kernels.dst import scoring


class AddOne(nn.Module):
    def __init__(self, inplace):
        super().__init__()
        self.inplace = inplace

    def forward(self, h):
        if self.inplace:
            h += 1
            return h
        return h + 1


def _model(act):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), act, nn.Linear(64, 10))
    ftk.sparsify(model, density=0.5, block_size=16, distribution="uniform")
    return model


@pytest.mark.parametrize("inplace, plain", [
    (nn.ReLU(inplace=True), nn.ReLU()),
    (nn.Hardswish(inplace=True), nn.Hardswish()),
    (AddOne(inplace=True), AddOne(inplace=False)),
])
@pytest.mark.parametrize("lead", [(8,), (2, 4)])  # (2, 4): the linear op's output is a reshaped view
def test_rigl_scores_equal_those_without_the_inplace_op(inplace, plain, lead):
    scores = []
    for act in (inplace, plain):
        model = _model(act)
        dst = ftk.DynamicSparseTraining(model, torch.optim.SGD(model.parameters(), lr=0.1), update_interval=1,
                                        prune_rate=0.3, prune_rate_schedule="constant")
        x = torch.randn(*lead, 64, generator=torch.Generator().manual_seed(1))
        model(x).sum().backward()
        scores.append({name: scoring.dense_grad_block_norms(layer) for name, layer in dst.layers.items()})
        assert dst.step()["kind"] == "update"
    for name in scores[0]:
        torch.testing.assert_close(scores[0][name], scores[1][name])


def test_rigl_trains_mobilenet_v3_small():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(num_classes=10)  # Hardswish(inplace=True) after sparse layers
    ftk.sparsify(model, density=0.3, block_size=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    dst = ftk.DynamicSparseTraining(model, opt, update_interval=1, prune_rate=0.3, prune_rate_schedule="constant")
    for _ in range(2):
        x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        assert dst.step()["kind"] == "update"
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    dense = ftk.densify(copy.deepcopy(model)).eval()
    assert not any(isinstance(m, ftk.nn.BlockSparseModule) for m in dense.modules())
    with torch.no_grad():
        torch.testing.assert_close(dense(x), model(x), rtol=1e-4, atol=1e-5)
