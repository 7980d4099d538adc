"""FLOPs: a known model against a hand count, and FlopCounterMode counting our ops by live blocks."""

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import freetickets_kernels as ftk
from freetickets_kernels.flops import count_flops, parameter_count


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.ReLU(), nn.Flatten(),
                         nn.Linear(32 * 4 * 4, 8))


def test_dense_model_hand_count():
    report = count_flops(_model(), torch.randn(2, 16, 4, 4))
    conv = 2 * 16 * 9 * 32 * 16     # 2 x Cin*kh*kw x Cout x OH*OW
    fc = 2 * 512 * 8
    assert report.forward == conv + fc == report.dense_forward
    assert report.training(samples=10) == 3 * (conv + fc) * 10


def test_sparse_model_hand_count():
    model = _model()
    ftk.sparsify(model, 0.5, block_size=8, distribution="uniform")
    conv_layer, fc_layer = model[0], model[3]
    report = count_flops(model, torch.randn(1, 16, 4, 4))
    conv = 2 * conv_layer.layout.nnzb * 64 * 16
    fc = 2 * fc_layer.layout.nnzb * 64
    assert report.forward == conv + fc
    assert report.dense_forward == 2 * 16 * 9 * 32 * 16 + 2 * 512 * 8
    assert report.dense_gradient == report.dense_forward  # both layers are sparse
    assert report.training(samples=10, dense_gradient_samples=4) == 3 * (conv + fc) * 10 + 4 * report.dense_forward
    assert conv_layer.layout.nnzb == 4 * 18 // 2 and fc_layer.layout.nnzb == 64 // 2


def test_flop_counter_mode_counts_live_blocks():
    model = _model()
    ftk.sparsify(model, 0.5, block_size=8, distribution="uniform")
    x = torch.randn(3, 16, 4, 4)
    ours = count_flops(model, x)
    with FlopCounterMode(display=False) as counter:
        model(x)
    assert counter.get_total_flops() == 3 * ours.forward
    with FlopCounterMode(display=False) as counter:
        model(x.requires_grad_()).sum().backward()
    assert counter.get_total_flops() == 3 * 3 * ours.forward  # forward + grad-input + grad-values


def test_flop_counter_counts_rigl_dense_gradient():
    torch.manual_seed(0)
    layer = ftk.SparseLinear(64, 32, density=0.25, block_size=8)
    x = torch.randn(5, 64)
    grad = torch.randn(5, 32)
    with FlopCounterMode(display=False) as counter:
        ftk.dense_grad_block_norms(x, grad, layer.layout)
    assert counter.get_total_flops() == 2 * 5 * 64 * 32


def test_parameter_count():
    model = _model()
    dense = parameter_count(model)
    assert dense["params"] == dense["dense_params"] == sum(p.numel() for p in model.parameters())
    ftk.sparsify(model, 0.5, block_size=8, distribution="uniform")
    sparse = parameter_count(model)
    assert sparse["dense_params"] == dense["params"]
    assert sparse["params"] == pytest.approx(0.5 * (16 * 9 * 32 + 512 * 8) + 8)
