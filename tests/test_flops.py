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


def test_conv1d_dense_and_sparse_counted_by_live_blocks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(16, 32, 3, padding=1, bias=False), nn.ReLU(), nn.Conv1d(32, 8, 5, stride=2))
    x = torch.randn(2, 16, 20)
    dense = count_flops(model, x)
    first, second = 2 * 16 * 3 * 32 * 20, 2 * 32 * 5 * 8 * 8  # 2 x Cin*k x Cout x L_out
    assert dense.forward == dense.dense_forward == first + second
    ftk.sparsify(model, 0.5, block_size=8, distribution="uniform")
    assert all(isinstance(model[i], ftk.SparseConv1d) for i in (0, 2))
    report = count_flops(model, x)
    assert report.dense_forward == dense.forward
    assert [layer.kind for layer in report.layers] == ["SparseConv1d", "SparseConv1d"]
    assert report.forward == 2 * model[0].layout.nnzb * 64 * 20 + 2 * model[2].layout.nnzb * 64 * 8
    assert report.forward == pytest.approx(0.5 * dense.forward)  # uniform 0.5, whole blocks
    with FlopCounterMode(display=False) as counter:  # the op is counted by live blocks too
        model(x)
    assert counter.get_total_flops() == 2 * report.forward


@pytest.mark.parametrize("need_weights", [False, True])
def test_attention_projections_counted_and_flop_counter_mode_counts_the_rest(need_weights):
    torch.manual_seed(0)
    e, length = 64, 10
    mha = nn.MultiheadAttention(e, 4, batch_first=True)

    class Block(nn.Module):
        def __init__(self, attn):
            super().__init__()
            self.attn = attn

        def forward(self, x):
            return self.attn(x, x, x, need_weights=need_weights)[0]

    model = Block(mha)
    x = torch.randn(2, length, e)
    dense = count_flops(model, x)
    projections = 2 * 4 * length * e * e
    assert dense.forward == dense.dense_forward == projections
    sparse = Block(ftk.SparseMultiheadAttention.from_dense(mha, 0.25, block_size=16))
    report = count_flops(sparse, x)
    live = sum(getattr(sparse.attn, p).layout.nnzb for p in ("q_proj", "k_proj", "v_proj", "out_proj"))
    assert report.forward == 2 * live * 256 * length and report.dense_forward == projections
    assert report.forward == pytest.approx(0.25 * projections)
    # FlopCounterMode: the projections by live blocks, plus the attention products torch counts
    with FlopCounterMode(display=False) as counter:
        model(x)
    dense_total = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        sparse(x)
    attention = dense_total - 2 * projections  # what torch counts of the attention products
    assert counter.get_total_flops() == 2 * report.forward + attention  # sparse: the same products
    if need_weights:  # explicit bmm's: Q K^T and A V, batch 2 (CPU's SDPA kernel has no flop formula)
        assert attention == 2 * 2 * 2 * length * length * e
